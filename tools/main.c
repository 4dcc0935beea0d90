/* keyledger: the command-line tools. */
#include "tools.h"

#include <stdio.h>
#include <string.h>

static const char USAGE[] =
    "usage: keyledger <command> [options]\n"
    "  init        --data DIR --org NAME --owner-email EMAIL [--owner-name NAME] [--json]\n"
    "  org-create  --data DIR --org NAME --owner-email EMAIL [--owner-name NAME] [--json]\n"
    "  verify      --data DIR\n"
    "  replay      --data DIR [--from SEQ] [--until SEQ|TIME] [--type TYPE] [--org ID]\n"
    "  state       --data DIR --at TIME [--org ID]\n"
    "  snapshot    --data DIR\n"
    "  compact     --data DIR [--usage-retention-days N]\n";

int main(int argc, char **argv)
{
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } commands[] = {
        {"init", kl_tool_init},
        {"org-create", kl_tool_org_create},
        {"verify", kl_tool_verify},
        {"replay", kl_tool_replay},
        {"state", kl_tool_state},
        {"snapshot", kl_tool_snapshot},
        {"compact", kl_tool_compact},
    };
    kl_use_huge_pages(argv);
    if (argc < 2) {
        fputs(USAGE, stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "help") == 0) {
        fputs(USAGE, stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0)
            return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "keyledger: unknown command \"%s\"\n%s", argv[1], USAGE);
    return 2;
}
