/*
 * tools/ — the `keyledger` command: init, org-create, verify (and the
 * auditors' tools as they come). Each command is a function taking its own
 * argv and returning the exit status: 0 success, 1 a user-facing failure
 * (message on stderr), 2 bad usage.
 */
#ifndef KL_TOOLS_H
#define KL_TOOLS_H

int kl_tool_init(int argc, char **argv);
int kl_tool_org_create(int argc, char **argv);
int kl_tool_verify(int argc, char **argv);

#endif
