/*
 * API key secrets: making them and checking their shape (see log.h for the
 * format). The checksum lets a typo or a guessed string be refused without
 * touching the key index; the key id inside makes the lookup O(1); only the
 * SHA-256 of the secret is kept, compared in constant time by the caller.
 */
#include "log.h"

#include <string.h>
#include <zlib.h>

static const char b62[] =
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

enum { CRC_LEN = 6 };

static void crc_text(const char *s, size_t n, char out[CRC_LEN])
{
    uint32_t c = (uint32_t)crc32(0L, (const Bytef *)s, (uInt)n);
    for (int i = CRC_LEN - 1; i >= 0; i--) {
        out[i] = b62[c % 62];
        c /= 62;
    }
}

static bool is_b62(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') ||
           (c >= 'a' && c <= 'z');
}

int kl_secret_new(const char *prefix, kl_env env, const kl_id *key_id,
                  char out[KL_SECRET_MAX], uint8_t hash[KL_HASH_LEN],
                  char display[KL_DISPLAY_PREFIX_LEN + 1])
{
    size_t plen = strlen(prefix);
    const char *ename = kl_env_name(env);
    size_t elen = strlen(ename);
    if (plen == 0 || plen > KL_PREFIX_MAX || elen == 0)
        return KL_EINVAL;
    size_t n = 0;
    memcpy(out, prefix, plen);
    n += plen;
    out[n++] = '_';
    memcpy(out + n, ename, elen);
    n += elen;
    out[n++] = '_';
    kl_id_body(key_id, out + n);
    n += KL_ID_BODY_LEN;
    /* Uniform base62: draw bytes, keep those below 248 = 4 * 62. */
    size_t got = 0;
    while (got < KL_SECRET_RANDOM_LEN) {
        uint8_t r[64];
        if (kl_random(r, sizeof r) != KL_OK)
            return KL_EIO;
        for (size_t i = 0; i < sizeof r && got < KL_SECRET_RANDOM_LEN; i++)
            if (r[i] < 248)
                out[n + got++] = b62[r[i] % 62];
    }
    n += KL_SECRET_RANDOM_LEN;
    crc_text(out, n, out + n);
    n += CRC_LEN;
    out[n] = '\0';
    kl_sha256(out, n, hash);
    memcpy(display, out, KL_DISPLAY_PREFIX_LEN);
    display[KL_DISPLAY_PREFIX_LEN] = '\0';
    return KL_OK;
}

int kl_secret_parse(const char *s, size_t len, const char *prefix,
                    kl_id *key_id, kl_env *env)
{
    if (len > KL_SECRET_MAX)
        return KL_EINVAL;
    const char *first = memchr(s, '_', len);
    size_t plen = first != NULL ? (size_t)(first - s) : 0;
    if (plen == 0 || plen > KL_PREFIX_MAX)
        return KL_EINVAL;
    for (size_t i = 0; i < plen; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9')))
            return KL_EINVAL;
    if (prefix != NULL && (strlen(prefix) != plen || memcmp(s, prefix, plen) != 0))
        return KL_EINVAL;
    const char *e = s + plen + 1;
    const char *us = memchr(e, '_', len - plen - 1);
    if (us == NULL)
        return KL_EINVAL;
    *env = kl_env_parse(e, (size_t)(us - e));
    if (*env == KL_ENV_NONE)
        return KL_EINVAL;
    const char *body = us + 1;
    size_t blen = len - (size_t)(body - s);
    if (blen < KL_ID_BODY_LEN + 32 + CRC_LEN)
        return KL_EINVAL;
    for (size_t i = KL_ID_BODY_LEN; i < blen; i++)
        if (!is_b62(body[i]))
            return KL_EINVAL;
    char crc[CRC_LEN];
    crc_text(s, len - CRC_LEN, crc);
    if (memcmp(crc, s + len - CRC_LEN, CRC_LEN) != 0)
        return KL_EINVAL;
    return kl_id_parse_body(body, KL_ID_BODY_LEN, key_id);
}
