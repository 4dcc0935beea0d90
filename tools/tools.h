/*
 * tools/ — the `keyledger` command: init, org-create, verify, the auditors'
 * replay and state, and the operators' snapshot and compact. Each command
 * is a function taking its own argv and returning the exit status: 0
 * success, 1 a user-facing failure (message on stderr), 2 bad usage.
 */
#ifndef KL_TOOLS_H
#define KL_TOOLS_H

#include "log.h"

int kl_tool_init(int argc, char **argv);
int kl_tool_org_create(int argc, char **argv);
int kl_tool_verify(int argc, char **argv);
int kl_tool_replay(int argc, char **argv);
int kl_tool_state(int argc, char **argv);
int kl_tool_snapshot(int argc, char **argv);
int kl_tool_compact(int argc, char **argv);

/* Writes the snapshot of the state at the head of `log` (its data dir is
 * `data`): the state rebuilt as the daemon does, from the newest snapshot
 * that fits and the records after it. *bytes: the file's size. */
int kl_tool_write_snapshot(kl_log *log, const char *data, const kl_logger *lg,
                           uint64_t *bytes, kl_err *err);

/* What a kl_tool_walk callback returns to end the walk early, not as an
 * error. */
enum { KL_TOOL_STOP = 1 };

/*
 * The read-only walk replay and state share (tools/replay.c): opens the log
 * in `data` without the lock (it works while the daemon runs; a torn tail
 * is left out, records appended after the open are not read), and feeds
 * every record from `from_seq` on to fn with its chain hash, checking each
 * record's prev against the hash of the one before it. fn returns 0 to go
 * on, KL_TOOL_STOP to end, or a negative code with its message in *fn_err
 * (borrowed). Returns the exit status: 0, or 1 after a message on stderr
 * that names the segment and offset where the log or fn failed.
 */
int kl_tool_walk(const char *data, uint64_t from_seq, kl_log_record_fn fn,
                 void *arg, kl_err *fn_err);

#endif
