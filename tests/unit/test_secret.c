/*
 * tests/unit/test_secret.c — typed ids, timestamps and API key secrets:
 * their text forms, exactly as docs and clients see them, and everything
 * the parsers must refuse.
 *
 * Known values (id text, epoch milliseconds, secret checksums) were computed
 * outside this code base. Parsers are always handed a heap copy of exactly
 * the bytes they may read, so reading one byte too far is a sanitizer error.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/sha.h>
#include <zlib.h>

#include "log.h"

static const char B32[] = "0123456789abcdefghjkmnpqrstvwxyz";
static const char B62[] =
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/* ---- exact-length calls ------------------------------------------------- */

static char *dup_exact(const char *s, size_t n)
{
    char *p = malloc(n > 0 ? n : 1);
    assert_non_null(p);
    memcpy(p, s, n);
    return p;
}

static int id_parse(kl_id_kind kind, const char *s, kl_id *out)
{
    size_t n = strlen(s);
    char *p = dup_exact(s, n);
    int rc = kl_id_parse(kind, p, n, out);
    free(p);
    return rc;
}

static int id_parse_body(const char *s, size_t n, kl_id *out)
{
    char *p = dup_exact(s, n);
    int rc = kl_id_parse_body(p, n, out);
    free(p);
    return rc;
}

static int time_parse(const char *s, int64_t *ms)
{
    size_t n = strlen(s);
    char *p = dup_exact(s, n);
    int rc = kl_time_parse(p, n, ms);
    free(p);
    return rc;
}

static int secret_parse(const char *s, size_t n, const char *prefix, kl_id *id,
                        kl_env *env)
{
    char *p = dup_exact(s, n);
    int rc = kl_secret_parse(p, n, prefix, id, env);
    free(p);
    return rc;
}

/* ---- ids --------------------------------------------------------------- */

static void test_id_known_text(void **state)
{
    (void)state;
    static const uint8_t bytes[16] = {0x01, 0x94, 0x7a, 0x39, 0xa7, 0x05, 0xd0,
                                      0xa8, 0x8e, 0x1a, 0xe4, 0xf8, 0x14, 0xb6,
                                      0x35, 0xcf};
    kl_id id;
    memcpy(id.b, bytes, 16);
    char text[KL_ID_TEXT_MAX];
    kl_id_format(KL_ID_KEY, &id, text);
    assert_string_equal(text, "key_01jhx3k9r5t2m8w6q4z0abcdef");
    char body[KL_ID_BODY_LEN];
    kl_id_body(&id, body);
    assert_memory_equal(body, "01jhx3k9r5t2m8w6q4z0abcdef", KL_ID_BODY_LEN);
    kl_id back;
    assert_int_equal(id_parse(KL_ID_KEY, text, &back), KL_OK);
    assert_memory_equal(back.b, bytes, 16);
    /* The top 48 bits are the milliseconds. */
    assert_int_equal(kl_id_time_ms(&id), 0x01947a39a705ll);

    memset(id.b, 0, 16);
    kl_id_format(KL_ID_ORG, &id, text);
    assert_string_equal(text, "org_00000000000000000000000000");
    assert_true(kl_id_is_zero(&id));
    memset(id.b, 0xff, 16);
    kl_id_format(KL_ID_SA, &id, text);
    assert_string_equal(text, "sa_7zzzzzzzzzzzzzzzzzzzzzzzzz");
    assert_false(kl_id_is_zero(&id));
    assert_int_equal(id_parse(KL_ID_SA, text, &back), KL_OK);
    assert_memory_equal(back.b, id.b, 16);

    static const char *const prefixes[KL_ID_KIND_COUNT] = {
        "org_", "usr_", "sa_", "key_", "alr_", "cmp_", "ses_", "msg_", "req_"};
    for (int k = 0; k < KL_ID_KIND_COUNT; k++)
        assert_string_equal(kl_id_prefix((kl_id_kind)k), prefixes[k]);
}

/* 128 bits as 26 base32 digits, most significant first, computed one bit at
 * a time (two leading zero bits pad 128 to 130). */
static void body_by_bits(const kl_id *id, char out[KL_ID_BODY_LEN])
{
    for (int d = 0; d < KL_ID_BODY_LEN; d++) {
        unsigned v = 0;
        for (int k = 0; k < 5; k++) {
            int bit = d * 5 + k - 2;    /* index into the 128 bits */
            unsigned b = bit < 0 ? 0 : (id->b[bit / 8] >> (7 - bit % 8)) & 1;
            v = v << 1 | b;
        }
        out[d] = B32[v];
    }
}

static void test_id_new_monotonic(void **state)
{
    (void)state;
    kl_idgen g;
    kl_idgen_init(&g);
    const int64_t ms = 1768473000123;
    kl_id prev, id;
    char prev_text[KL_ID_TEXT_MAX], text[KL_ID_TEXT_MAX];
    assert_int_equal(kl_id_new(&g, ms, &prev), KL_OK);
    kl_id_format(KL_ID_KEY, &prev, prev_text);
    for (int i = 0; i < 1000; i++) {
        assert_int_equal(kl_id_new(&g, ms, &id), KL_OK);
        assert_true(memcmp(prev.b, id.b, 16) < 0);
        assert_int_equal(kl_id_time_ms(&id), ms);
        kl_id_format(KL_ID_KEY, &id, text);
        assert_true(strcmp(prev_text, text) < 0);   /* text order = id order */
        char bits[KL_ID_BODY_LEN];
        body_by_bits(&id, bits);
        assert_memory_equal(text + 4, bits, KL_ID_BODY_LEN);
        kl_id back;
        assert_int_equal(id_parse(KL_ID_KEY, text, &back), KL_OK);
        assert_true(kl_id_eq(&back, &id));
        prev = id;
        memcpy(prev_text, text, sizeof text);
    }
    /* The clock stepping back does not make ids go back. */
    assert_int_equal(kl_id_new(&g, ms - 5000, &id), KL_OK);
    assert_true(memcmp(prev.b, id.b, 16) < 0);
    assert_int_equal(kl_id_time_ms(&id), ms);
    prev = id;
    /* A later millisecond starts a new random part, still greater. */
    assert_int_equal(kl_id_new(&g, ms + 1, &id), KL_OK);
    assert_true(memcmp(prev.b, id.b, 16) < 0);
    assert_int_equal(kl_id_time_ms(&id), ms + 1);
    /* Two generators in the same ms do not collide. */
    kl_idgen g2;
    kl_idgen_init(&g2);
    kl_id other;
    assert_int_equal(kl_id_new(&g2, ms + 1, &other), KL_OK);
    assert_false(kl_id_eq(&id, &other));
}

static void test_id_parse_rejects(void **state)
{
    (void)state;
    const char *good = "key_01jhx3k9r5t2m8w6q4z0abcdef";
    kl_id id;
    assert_int_equal(id_parse(KL_ID_KEY, good, &id), KL_OK);

    /* Wrong prefix for the kind, or none. */
    assert_int_equal(id_parse(KL_ID_USER, good, &id), KL_EINVAL);
    assert_int_equal(id_parse(KL_ID_KEY, "usr_01jhx3k9r5t2m8w6q4z0abcdef", &id),
                     KL_EINVAL);
    assert_int_equal(id_parse(KL_ID_KEY, "KEY_01jhx3k9r5t2m8w6q4z0abcdef", &id),
                     KL_EINVAL);
    assert_int_equal(id_parse(KL_ID_KEY, "key-01jhx3k9r5t2m8w6q4z0abcdef", &id),
                     KL_EINVAL);
    assert_int_equal(id_parse(KL_ID_KEY, "01jhx3k9r5t2m8w6q4z0abcdef", &id),
                     KL_EINVAL);
    assert_int_equal(id_parse(KL_ID_SA, "sa01jhx3k9r5t2m8w6q4z0abcdef0", &id),
                     KL_EINVAL);
    /* Wrong length. */
    assert_int_equal(id_parse(KL_ID_KEY, "key_01jhx3k9r5t2m8w6q4z0abcde", &id),
                     KL_EINVAL);
    assert_int_equal(id_parse(KL_ID_KEY, "key_01jhx3k9r5t2m8w6q4z0abcdef0", &id),
                     KL_EINVAL);
    assert_int_equal(id_parse(KL_ID_KEY, "key_", &id), KL_EINVAL);
    assert_int_equal(id_parse(KL_ID_KEY, "", &id), KL_EINVAL);

    /* A bad character at every position of the body. */
    const char bad[] = {'i', 'l', 'o', 'u', 'I', 'L', 'O', 'U', 'A', 'Z', '-',
                        '_', ' ', '\0', '{', '/', ':', '@', '\x80'};
    char s[KL_ID_TEXT_MAX];
    for (size_t pos = 4; pos < 30; pos++) {
        for (size_t b = 0; b < sizeof bad; b++) {
            memcpy(s, good, 30);
            s[pos] = bad[b];
            char *p = dup_exact(s, 30);
            if (kl_id_parse(KL_ID_KEY, p, 30, &id) != KL_EINVAL)
                fail_msg("accepted 0x%02x at %zu", (unsigned char)bad[b], pos);
            free(p);
        }
    }
    /* The first digit carries only 3 bits: 0-7. */
    for (const char *c = B32; *c != '\0'; c++) {
        memcpy(s, good, 31);
        s[4] = *c;
        int want = *c <= '7' ? KL_OK : KL_EINVAL;
        assert_int_equal(id_parse(KL_ID_KEY, s, &id), want);
    }
    assert_int_equal(id_parse_body("8zzzzzzzzzzzzzzzzzzzzzzzzz", 26, &id), KL_EINVAL);
    assert_int_equal(id_parse_body("7zzzzzzzzzzzzzzzzzzzzzzzzz", 26, &id), KL_OK);
    assert_int_equal(id_parse_body("7zzzzzzzzzzzzzzzzzzzzzzzzz", 25, &id), KL_EINVAL);
}

/* ---- time ------------------------------------------------------------- */

static void assert_time_text(int64_t ms, const char *want)
{
    char out[KL_TIME_TEXT_LEN + 1];
    memset(out, '#', sizeof out);
    kl_time_format(ms, out);
    assert_string_equal(out, want);
    int64_t back = -1;
    assert_int_equal(time_parse(want, &back), KL_OK);
    assert_int_equal(back, ms);
}

static void test_time_known(void **state)
{
    (void)state;
    assert_time_text(0, "1970-01-01T00:00:00.000Z");
    assert_time_text(1, "1970-01-01T00:00:00.001Z");
    assert_time_text(-1, "1969-12-31T23:59:59.999Z");
    assert_time_text(1768473000000, "2026-01-15T10:30:00.000Z");
    assert_time_text(1709210096789, "2024-02-29T12:34:56.789Z");    /* leap day */
    assert_time_text(951782400000, "2000-02-29T00:00:00.000Z");     /* 400-year */
    assert_time_text(4107542400000, "2100-03-01T00:00:00.000Z");    /* not leap */
    assert_time_text(2147483647999, "2038-01-19T03:14:07.999Z");
    assert_time_text(2147483648000, "2038-01-19T03:14:08.000Z");    /* 2^31 s */
    assert_time_text(4102444800000, "2100-01-01T00:00:00.000Z");
    assert_time_text(253402300799999, "9999-12-31T23:59:59.999Z");
}

static void test_time_round_trip(void **state)
{
    (void)state;
    uint64_t x = 88172645463325252ull;
    for (int i = 0; i < 20000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        int64_t ms = (int64_t)(x % 253402300800000ull);
        char out[KL_TIME_TEXT_LEN + 1];
        kl_time_format(ms, out);
        assert_int_equal(strlen(out), KL_TIME_TEXT_LEN);
        int64_t back;
        assert_int_equal(time_parse(out, &back), KL_OK);
        assert_int_equal(back, ms);
    }
}

static void test_time_parse_forms(void **state)
{
    (void)state;
    const int64_t t = 1768473000000;    /* 2026-01-15T10:30:00Z */
    static const struct { const char *s; int64_t ms; } ok[] = {
        {"2026-01-15T10:30:00Z", 0},
        {"2026-01-15T10:30:00.000Z", 0},
        {"2026-01-15t10:30:00z", 0},
        {"2026-01-15T12:30:00+02:00", 0},
        {"2026-01-15T05:00:00-05:30", 0},
        {"2026-01-16T00:00:00+13:30", 0},
        {"2026-01-15T10:30:00+00:00", 0},
        {"2026-01-15T10:30:00-00:00", 0},
        {"2026-01-15T10:30:00.1Z", 100},
        {"2026-01-15T10:30:00.12Z", 120},
        {"2026-01-15T10:30:00.123Z", 123},
        {"2026-01-15T10:30:00.1234Z", 123},
        {"2026-01-15T10:30:00.12345Z", 123},
        {"2026-01-15T10:30:00.123456Z", 123},
        {"2026-01-15T10:30:00.1234567Z", 123},
        {"2026-01-15T10:30:00.12345678Z", 123},
        {"2026-01-15T10:30:00.999999999Z", 999},   /* truncated, not rounded */
        {"2026-01-15T12:30:00.5+02:00", 500},
    };
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
        int64_t ms = -1;
        if (time_parse(ok[i].s, &ms) != KL_OK)
            fail_msg("refused %s", ok[i].s);
        assert_int_equal(ms, t + ok[i].ms);
    }
    int64_t ms;
    assert_int_equal(time_parse("2024-02-29T00:00:00Z", &ms), KL_OK);
    assert_int_equal(time_parse("2000-02-29T00:00:00Z", &ms), KL_OK);
    assert_int_equal(time_parse("1970-01-01T00:00:00+01:00", &ms), KL_OK);
    assert_int_equal(ms, -3600000);
}

static void test_time_parse_rejects(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "2026-02-30T00:00:00Z",     /* no such day */
        "2026-02-29T00:00:00Z",     /* not a leap year */
        "2100-02-29T00:00:00Z",     /* centuries are not, but every 400th */
        "2026-04-31T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-00-10T00:00:00Z",
        "2026-01-00T00:00:00Z",
        "2026-01-32T00:00:00Z",
        "2026-01-15T24:00:00Z",     /* hour 24 */
        "2026-01-15T23:60:00Z",
        "2026-01-15T23:59:60Z",     /* leap seconds are not kept */
        "2026-01-15T10:30:00",      /* no zone */
        "2026-01-15T10:30:00.000",
        "2026-01-15T10:30:00.Z",    /* empty fraction */
        "2026-01-15T10:30:00.1234567890Z", /* 10 digits */
        "2026-01-15T10:30:00ZZ",
        "2026-01-15T10:30:00Z ",
        "2026-01-15T10:30:00+0200",
        "2026-01-15T10:30:00+02",
        "2026-01-15T10:30:00+24:00",
        "2026-01-15T10:30:00+02:60",
        "2026-01-15T10:30:00+02:00Z",
        "2026-01-15X10:30:00Z",
        "2026-01-15 10:30:00Z",
        "2026/01/15T10:30:00Z",
        "2026-1-15T10:30:00Z",
        "26-01-15T10:30:00Z",
        "2026-01-15T10:30Z",
        "2026-01-15T1a:30:00Z",
        "+026-01-15T10:30:00Z",
        "2026-01-15",
        "",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        int64_t ms = 42;
        if (time_parse(bad[i], &ms) != KL_EINVAL)
            fail_msg("accepted \"%s\"", bad[i]);
        assert_int_equal(ms, 42);   /* untouched */
    }
}

/* ---- secrets ------------------------------------------------------------ */

/* zlib CRC-32 of `n` characters as 6 base62 digits, most significant
 * first. */
static void crc_text(const char *s, size_t n, char out[6])
{
    uint32_t c = (uint32_t)crc32(0L, (const Bytef *)s, (uInt)n);
    for (int i = 5; i >= 0; i--) {
        out[i] = B62[c % 62];
        c /= 62;
    }
}

/* Rewrites the last 6 characters to the right checksum, so that a test
 * string is refused for its shape and not for its checksum. */
static void fix_crc(char *s)
{
    size_t n = strlen(s);
    assert_true(n > 6);
    crc_text(s, n - 6, s + n - 6);
}

static void test_secret_known_value(void **state)
{
    (void)state;
    /* Checksums computed outside this code base. */
    const char *s = "kl_live_01jhx3k9r5t2m8w6q4z0abcdef"
                    "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789ABCD" "3UWcXc";
    char c[6];
    crc_text(s, strlen(s) - 6, c);
    assert_memory_equal(c, "3UWcXc", 6);
    kl_id id;
    kl_env env = KL_ENV_NONE;
    assert_int_equal(secret_parse(s, strlen(s), "kl", &id, &env), KL_OK);
    assert_int_equal(env, KL_ENV_LIVE);
    static const uint8_t bytes[16] = {0x01, 0x94, 0x7a, 0x39, 0xa7, 0x05, 0xd0,
                                      0xa8, 0x8e, 0x1a, 0xe4, 0xf8, 0x14, 0xb6,
                                      0x35, 0xcf};
    assert_memory_equal(id.b, bytes, 16);
    assert_int_equal(secret_parse(s, strlen(s), NULL, &id, &env), KL_OK);

    const char *t = "acme_test_7zzzzzzzzzzzzzzzzzzzzzzzzz"
                    "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz" "1WT9Bx";
    assert_int_equal(secret_parse(t, strlen(t), "acme", &id, &env), KL_OK);
    assert_int_equal(env, KL_ENV_TEST);
    for (int i = 0; i < 16; i++)
        assert_int_equal(id.b[i], 0xff);
    assert_int_equal(secret_parse(t, strlen(t), "kl", &id, &env), KL_EINVAL);
}

static void test_secret_new_format(void **state)
{
    (void)state;
    kl_idgen g;
    kl_idgen_init(&g);
    bool seen_char[128] = {false};
    char last[KL_SECRET_MAX] = "";
    for (int round = 0; round < 300; round++) {
        kl_id key;
        assert_int_equal(kl_id_new(&g, 1768473000000 + round, &key), KL_OK);
        const char *prefix = round % 3 == 0 ? "kl" : round % 3 == 1 ? "acme2" :
                                                    "abcdefghijklmnop";
        kl_env env = round % 2 ? KL_ENV_TEST : KL_ENV_LIVE;
        char out[KL_SECRET_MAX], display[KL_DISPLAY_PREFIX_LEN + 1];
        uint8_t hash[KL_HASH_LEN];
        memset(out, '#', sizeof out);
        assert_int_equal(kl_secret_new(prefix, env, &key, out, hash, display), KL_OK);

        /* <prefix>_<env>_<26 id><40 random><6 crc> */
        char head[64];
        snprintf(head, sizeof head, "%s_%s_", prefix, kl_env_name(env));
        size_t hl = strlen(head), n = strlen(out);
        assert_int_equal(n, hl + KL_ID_BODY_LEN + KL_SECRET_RANDOM_LEN + 6);
        assert_memory_equal(out, head, hl);
        char body[KL_ID_BODY_LEN];
        kl_id_body(&key, body);
        assert_memory_equal(out + hl, body, KL_ID_BODY_LEN);
        const char *rnd = out + hl + KL_ID_BODY_LEN;
        for (int i = 0; i < KL_SECRET_RANDOM_LEN; i++) {
            assert_non_null(strchr(B62, rnd[i]));
            assert_true(rnd[i] != '\0');
            seen_char[(unsigned char)rnd[i]] = true;
        }
        char crc[6];
        crc_text(out, n - 6, crc);
        assert_memory_equal(out + n - 6, crc, 6);

        uint8_t h[KL_HASH_LEN];
        SHA256((const unsigned char *)out, n, h);
        assert_memory_equal(hash, h, KL_HASH_LEN);
        assert_int_equal(strlen(display), KL_DISPLAY_PREFIX_LEN);
        assert_memory_equal(display, out, KL_DISPLAY_PREFIX_LEN);

        kl_id back;
        kl_env benv;
        assert_int_equal(secret_parse(out, n, prefix, &back, &benv), KL_OK);
        assert_true(kl_id_eq(&back, &key));
        assert_int_equal(benv, env);
        assert_int_equal(secret_parse(out, n, NULL, &back, &benv), KL_OK);
        assert_true(kl_id_eq(&back, &key));
        assert_int_equal(benv, env);
        assert_string_not_equal(out, last);
        memcpy(last, out, sizeof last);
    }
    /* 12000 random characters: every one of the 62 shows up. */
    for (const char *c = B62; *c != '\0'; c++)
        assert_true(seen_char[(unsigned char)*c]);

    kl_id key = {{1}};
    char out[KL_SECRET_MAX], display[KL_DISPLAY_PREFIX_LEN + 1];
    uint8_t hash[KL_HASH_LEN];
    assert_int_equal(kl_secret_new("", KL_ENV_LIVE, &key, out, hash, display),
                     KL_EINVAL);
    assert_int_equal(kl_secret_new("abcdefghijklmnopq", KL_ENV_LIVE, &key, out,
                                   hash, display), KL_EINVAL);
    assert_int_equal(kl_secret_new("kl", KL_ENV_NONE, &key, out, hash, display),
                     KL_EINVAL);
}

static void make_secret(char out[KL_SECRET_MAX], kl_id *key)
{
    kl_idgen g;
    kl_idgen_init(&g);
    assert_int_equal(kl_id_new(&g, 1768473000000, key), KL_OK);
    char display[KL_DISPLAY_PREFIX_LEN + 1];
    uint8_t hash[KL_HASH_LEN];
    assert_int_equal(kl_secret_new("kl", KL_ENV_LIVE, key, out, hash, display),
                     KL_OK);
}

static void expect_refused(const char *s, const char *prefix, const char *why)
{
    kl_id id;
    kl_env env;
    if (secret_parse(s, strlen(s), prefix, &id, &env) != KL_EINVAL)
        fail_msg("accepted (%s): %s", why, s);
}

/* Any single changed character is caught, by shape or by checksum. */
static void test_secret_any_change_refused(void **state)
{
    (void)state;
    char s[KL_SECRET_MAX];
    kl_id key;
    make_secret(s, &key);
    size_t n = strlen(s);
    char t[KL_SECRET_MAX];
    for (size_t pos = 0; pos < n; pos++) {
        const char *repl = "0aZ9zA1_-";
        for (const char *r = repl; *r != '\0'; r++) {
            if (*r == s[pos])
                continue;
            memcpy(t, s, n + 1);
            t[pos] = *r;
            expect_refused(t, "kl", "one character changed");
            expect_refused(t, NULL, "one character changed");
        }
    }
    /* Two characters swapped. */
    for (size_t pos = 0; pos + 1 < n; pos++) {
        if (s[pos] == s[pos + 1])
            continue;
        memcpy(t, s, n + 1);
        t[pos] = s[pos + 1];
        t[pos + 1] = s[pos];
        expect_refused(t, NULL, "two characters swapped");
    }
}

static void test_secret_shape_refused(void **state)
{
    (void)state;
    char s[KL_SECRET_MAX];
    kl_id key;
    make_secret(s, &key);
    size_t n = strlen(s);
    kl_id id;
    kl_env env;
    assert_int_equal(secret_parse(s, n, "kl", &id, &env), KL_OK);
    const char *rest = s + strlen("kl_live_");      /* id, random, crc */
    char t[2 * KL_SECRET_MAX];

    /* Someone else's product prefix. */
    expect_refused(s, "kx", "wrong prefix");
    expect_refused(s, "k", "shorter prefix");
    expect_refused(s, "kl_", "prefix with separator");
    expect_refused(s, "kll", "longer prefix");
    snprintf(t, sizeof t, "acme_live_%s", rest);
    fix_crc(t);
    expect_refused(t, "kl", "another product's prefix");
    assert_int_equal(secret_parse(t, strlen(t), NULL, &id, &env), KL_OK);
    assert_true(kl_id_eq(&id, &key));

    /* Prefixes that no secret can have: checked even with NULL. */
    const char *bad_prefix[] = {"KL", "k-l", "k.l", "", "abcdefghijklmnopq",
                                "k l"};
    for (size_t i = 0; i < sizeof bad_prefix / sizeof *bad_prefix; i++) {
        snprintf(t, sizeof t, "%s_live_%s", bad_prefix[i], rest);
        fix_crc(t);
        expect_refused(t, NULL, bad_prefix[i]);
    }
    snprintf(t, sizeof t, "abcdefghijklmnop_live_%s", rest);  /* 16: fine */
    fix_crc(t);
    assert_int_equal(secret_parse(t, strlen(t), NULL, &id, &env), KL_OK);

    /* Environments other than live and test. */
    const char *bad_env[] = {"prod", "LIVE", "", "liv", "lives", "test2"};
    for (size_t i = 0; i < sizeof bad_env / sizeof *bad_env; i++) {
        snprintf(t, sizeof t, "kl_%s_%s", bad_env[i], rest);
        fix_crc(t);
        expect_refused(t, "kl", bad_env[i]);
        expect_refused(t, NULL, bad_env[i]);
    }
    snprintf(t, sizeof t, "kl_test_%s", rest);
    fix_crc(t);
    assert_int_equal(secret_parse(t, strlen(t), "kl", &id, &env), KL_OK);
    assert_int_equal(env, KL_ENV_TEST);

    /* The random part: we make 40 characters; the contract accepts 32 or
     * more, up to KL_SECRET_MAX in all. Checksums are right throughout. */
    for (size_t rlen = 20; rlen <= 120; rlen++) {
        snprintf(t, sizeof t, "kl_live_%.*s", KL_ID_BODY_LEN, rest);
        for (size_t k = 0; k < rlen; k++)
            t[8 + KL_ID_BODY_LEN + k] = B62[(k * 7) % 62];
        memcpy(t + 8 + KL_ID_BODY_LEN + rlen, "XXXXXX", 7);
        fix_crc(t);
        size_t len = strlen(t);
        int want = rlen >= 32 && len <= KL_SECRET_MAX ? KL_OK : KL_EINVAL;
        if (secret_parse(t, len, "kl", &id, &env) != want)
            fail_msg("random part of %zu (%zu in all): expected %d", rlen, len,
                     want);
        if (want == KL_OK) {
            assert_true(kl_id_eq(&id, &key));
            assert_int_equal(env, KL_ENV_LIVE);
        }
        if (len == KL_SECRET_MAX)
            assert_int_equal(want, KL_OK);
    }
    /* A real secret cut short (its checksum then covers other text). */
    for (size_t cut = 1; cut < n; cut++)
        assert_int_equal(secret_parse(s, n - cut, "kl", &id, &env), KL_EINVAL);

    /* Non-base62 in the random part; bad base32 in the id part. */
    const char not_b62[] = {'-', '_', '+', '/', '=', '.', ' ', '\x7f', '\xc3'};
    for (size_t i = 0; i < sizeof not_b62; i++) {
        for (size_t pos = KL_ID_BODY_LEN; pos < KL_ID_BODY_LEN + KL_SECRET_RANDOM_LEN;
             pos += 13) {
            snprintf(t, sizeof t, "kl_live_%s", rest);
            t[8 + pos] = not_b62[i];
            fix_crc(t);
            expect_refused(t, "kl", "not base62");
        }
    }
    const char not_b32[] = {'i', 'l', 'o', 'u', 'A', 'Z', '-'};
    for (size_t i = 0; i < sizeof not_b32; i++) {
        snprintf(t, sizeof t, "kl_live_%s", rest);
        t[8 + 5] = not_b32[i];
        fix_crc(t);
        expect_refused(t, "kl", "not base32");
    }
    snprintf(t, sizeof t, "kl_live_%s", rest);
    t[8] = '8';                         /* more than 128 bits */
    fix_crc(t);
    expect_refused(t, "kl", "id overflows");

    /* Short, empty and over-long strings. */
    expect_refused("", NULL, "empty");
    expect_refused("kl", NULL, "prefix only");
    expect_refused("kl_", NULL, "prefix and separator");
    expect_refused("kl_live", NULL, "no second separator");
    expect_refused("kl_live_", NULL, "no body");
    expect_refused("_live_", NULL, "no prefix");
    snprintf(t, sizeof t, "kl_live_%.*s", KL_ID_BODY_LEN, rest);
    expect_refused(t, NULL, "id only");
    char longest[2 * KL_SECRET_MAX];
    memset(longest, 'a', sizeof longest - 1);
    longest[sizeof longest - 1] = '\0';
    memcpy(longest, "kl_live_", 8);
    fix_crc(longest);
    expect_refused(longest, NULL, "longer than KL_SECRET_MAX");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_id_known_text),
        cmocka_unit_test(test_id_new_monotonic),
        cmocka_unit_test(test_id_parse_rejects),
        cmocka_unit_test(test_time_known),
        cmocka_unit_test(test_time_round_trip),
        cmocka_unit_test(test_time_parse_forms),
        cmocka_unit_test(test_time_parse_rejects),
        cmocka_unit_test(test_secret_known_value),
        cmocka_unit_test(test_secret_new_format),
        cmocka_unit_test(test_secret_any_change_refused),
        cmocka_unit_test(test_secret_shape_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
