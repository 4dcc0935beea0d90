/*
 * keyledger init / org-create: a new organization with its owner and one
 * owner key, written to the log as OrgCreated, UserInvited and KeyCreated in
 * one fsynced batch. The key is printed once and never stored.
 */
#include "tools.h"

#include "log.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct org_args {
    const char *data, *org, *email, *name;
    bool json;
} org_args;

static int parse(int argc, char **argv, const char *cmd, org_args *a)
{
    static const struct option opts[] = {
        {"data", required_argument, NULL, 'd'},
        {"org", required_argument, NULL, 'o'},
        {"owner-email", required_argument, NULL, 'e'},
        {"owner-name", required_argument, NULL, 'n'},
        {"json", no_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    memset(a, 0, sizeof *a);
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'd': a->data = optarg; break;
        case 'o': a->org = optarg; break;
        case 'e': a->email = optarg; break;
        case 'n': a->name = optarg; break;
        case 'j': a->json = true; break;
        default: goto usage;
        }
    }
    if (optind != argc || a->data == NULL || a->org == NULL || a->email == NULL)
        goto usage;
    return 0;
usage:
    fprintf(stderr, "usage: keyledger %s --data DIR --org NAME --owner-email EMAIL "
            "[--owner-name NAME] [--json]\n", cmd);
    return 2;
}

/* The same rules the API applies to an invited user's email. */
static bool email_ok(const char *e)
{
    size_t n = strlen(e);
    const char *at = strchr(e, '@');
    return n >= 3 && n <= 254 && at != NULL && at != e && at[1] != '\0' &&
           strchr(at + 1, '@') == NULL && strchr(at + 1, '.') != NULL &&
           strpbrk(e, " \t\r\n") == NULL;
}

static int create_org(const org_args *a, bool fresh)
{
    size_t org_len = strlen(a->org), name_len = a->name ? strlen(a->name) : 0;
    if (org_len == 0 || org_len > 128 || name_len > 128) {
        fprintf(stderr, "keyledger: organization and owner names must be 1 to 128 "
                "characters\n");
        return 1;
    }
    if (!email_ok(a->email)) {
        fprintf(stderr, "keyledger: \"%s\" is not a valid email address\n", a->email);
        return 1;
    }
    kl_err err;
    kl_log_config cfg;
    kl_log_config_defaults(&cfg);
    cfg.dir = a->data;
    if (fresh && kl_log_create(&cfg, &err) != KL_OK) {
        fprintf(stderr, "keyledger: %s\n", err.msg);
        return 1;
    }
    kl_log *log;
    kl_log_recovery rec;
    if (kl_log_open(&log, &cfg, &rec, &err) != KL_OK) {
        fprintf(stderr, "keyledger: %s\n", err.msg);
        return 1;
    }
    int64_t now = kl_now_ms();
    kl_idgen ids;
    kl_idgen_init(&ids);
    kl_id org, user, key;
    char secret[KL_SECRET_MAX], display[KL_DISPLAY_PREFIX_LEN + 1];
    kl_event ev = {0};
    kl_buf batch = {0};
    kl_log_mark mark;
    kl_log_mark_get(log, &mark);
    int rc = kl_id_new(&ids, now, &org);
    if (rc == KL_OK)
        rc = kl_id_new(&ids, now, &user);
    if (rc == KL_OK)
        rc = kl_id_new(&ids, now, &key);
    ev.ts = now;
    ev.org = org;
    ev.actor.type = KL_PRINCIPAL_SYSTEM;
    if (rc == KL_OK) {
        ev.type = KL_EV_ORG_CREATED;
        ev.has = KL_F_NAME;
        ev.name = (kl_str){a->org, (uint32_t)org_len};
        rc = kl_log_frame_event(log, &ev, true, &batch);
    }
    if (rc == KL_OK) {
        ev.type = KL_EV_USER_INVITED;
        ev.has = KL_F_ID | KL_F_EMAIL | KL_F_ROLE | (a->name ? KL_F_NAME : 0);
        ev.id = user;
        ev.email = (kl_str){a->email, (uint32_t)strlen(a->email)};
        ev.name = (kl_str){a->name, (uint32_t)name_len};
        ev.role = KL_ROLE_OWNER;
        rc = kl_log_frame_event(log, &ev, true, &batch);
    }
    if (rc == KL_OK)
        rc = kl_secret_new("kl", KL_ENV_LIVE, &key, secret, ev.hash, display);
    if (rc == KL_OK) {
        ev.type = KL_EV_KEY_CREATED;
        ev.has = KL_F_ID | KL_F_NAME | KL_F_DESCRIPTION | KL_F_OWNER | KL_F_HASH |
                 KL_F_PREFIX | KL_F_ENV | KL_F_ACCESS;
        ev.id = key;
        ev.name = (kl_str){"owner key", 9};
        ev.description = (kl_str){"created by keyledger init", 25};
        ev.owner_type = KL_PRINCIPAL_USER;
        ev.owner = user;
        ev.prefix = (kl_str){display, KL_DISPLAY_PREFIX_LEN};
        ev.env = KL_ENV_LIVE;
        ev.access = KL_ACCESS_FULL;
        rc = kl_log_frame_event(log, &ev, false, &batch);
    }
    if (rc == KL_OK)
        rc = kl_log_write(log, &batch, &mark, &err);
    else
        kl_err_set(&err, "cannot build the events (%d)", rc);
    kl_buf_free(&batch);
    kl_log_close(log);
    if (rc != KL_OK) {
        fprintf(stderr, "keyledger: %s\n", err.msg);
        return 1;
    }
    char org_id[KL_ID_TEXT_MAX], user_id[KL_ID_TEXT_MAX], key_id[KL_ID_TEXT_MAX];
    kl_id_format(KL_ID_ORG, &org, org_id);
    kl_id_format(KL_ID_USER, &user, user_id);
    kl_id_format(KL_ID_KEY, &key, key_id);
    if (a->json)
        printf("{\"org_id\":\"%s\",\"user_id\":\"%s\",\"key_id\":\"%s\",\"key\":\"%s\"}\n",
               org_id, user_id, key_id, secret);
    else
        printf("organization %s\nowner        %s (%s)\nowner key    %s\n\n"
               "  %s\n\nThis key is shown once: store it in a secrets manager now.\n",
               org_id, user_id, a->email, key_id, secret);
    return 0;
}

int kl_tool_init(int argc, char **argv)
{
    org_args a;
    int rc = parse(argc, argv, "init", &a);
    return rc != 0 ? rc : create_org(&a, true);
}

int kl_tool_org_create(int argc, char **argv)
{
    org_args a;
    int rc = parse(argc, argv, "org-create", &a);
    return rc != 0 ? rc : create_org(&a, false);
}
