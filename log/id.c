/*
 * Typed ids and timestamps.
 *
 * An id is 16 bytes: a 48-bit big-endian millisecond timestamp and 80 random
 * bits, like a ULID. Its text is a type prefix ("key_") and 26 lowercase
 * Crockford base32 characters (the 128 bits as one big-endian number, so the
 * first character is 0-7 and text order is time order). Within one
 * millisecond a generator increments the random part, so ids it hands out
 * are strictly increasing.
 */
#include "log.h"

#include <string.h>
#include <time.h>

static const char b32[] = "0123456789abcdefghjkmnpqrstvwxyz";

static const char *const prefixes[KL_ID_KIND_COUNT] = {
    [KL_ID_ORG] = "org_",      [KL_ID_USER] = "usr_",
    [KL_ID_SA] = "sa_",        [KL_ID_KEY] = "key_",
    [KL_ID_ALERT] = "alr_",    [KL_ID_COMPUTER] = "cmp_",
    [KL_ID_SESSION] = "ses_",  [KL_ID_MESSAGE] = "msg_",
    [KL_ID_REQUEST] = "req_",
};

const char *kl_id_prefix(kl_id_kind kind) { return prefixes[kind]; }

void kl_idgen_init(kl_idgen *g) { memset(g, 0, sizeof *g); }

int kl_id_new(kl_idgen *g, int64_t now_ms, kl_id *out)
{
    if (now_ms <= g->last_ms) {
        /* Same millisecond (or the clock stepped back): count up. */
        now_ms = g->last_ms;
        int i = 9;
        while (i >= 0 && ++g->last[i] == 0)
            i--;
        if (i < 0) {            /* 2^80 ids in one ms: take the next ms */
            now_ms = ++g->last_ms;
            if (kl_random(g->last, sizeof g->last) != KL_OK)
                return KL_EIO;
        }
    } else {
        if (kl_random(g->last, sizeof g->last) != KL_OK)
            return KL_EIO;
        /* Leave room to count up within the millisecond. */
        g->last[0] &= 0x7f;
        g->last_ms = now_ms;
    }
    uint64_t t = (uint64_t)now_ms;
    for (int i = 5; i >= 0; i--) {
        out->b[i] = (uint8_t)(t & 0xff);
        t >>= 8;
    }
    memcpy(out->b + 6, g->last, 10);
    return KL_OK;
}

bool kl_id_is_zero(const kl_id *id)
{
    static const kl_id zero;
    return memcmp(id, &zero, sizeof zero) == 0;
}

bool kl_id_eq(const kl_id *a, const kl_id *b)
{
    return memcmp(a->b, b->b, sizeof a->b) == 0;
}

int64_t kl_id_time_ms(const kl_id *id)
{
    uint64_t t = 0;
    for (int i = 0; i < 6; i++)
        t = (t << 8) | id->b[i];
    return (int64_t)t;
}

void kl_id_body(const kl_id *id, char out[KL_ID_BODY_LEN])
{
    /* 130 bits of output for 128 of input: walk 5 bits at a time from the
     * least significant end. */
    unsigned __int128 v = 0;
    for (int i = 0; i < 16; i++)
        v = (v << 8) | id->b[i];
    for (int i = KL_ID_BODY_LEN - 1; i >= 0; i--) {
        out[i] = b32[(unsigned)(v & 31)];
        v >>= 5;
    }
}

void kl_id_format(kl_id_kind kind, const kl_id *id, char *out)
{
    size_t n = strlen(prefixes[kind]);
    memcpy(out, prefixes[kind], n);
    kl_id_body(id, out + n);
    out[n + KL_ID_BODY_LEN] = '\0';
}

static int b32_value(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    const char *p = strchr(b32 + 10, c);
    return (c != '\0' && p != NULL) ? (int)(p - b32) : -1;
}

int kl_id_parse_body(const char *s, size_t len, kl_id *out)
{
    if (len != KL_ID_BODY_LEN)
        return KL_EINVAL;
    unsigned __int128 v = 0;
    for (size_t i = 0; i < len; i++) {
        int d = b32_value(s[i]);
        if (d < 0 || (i == 0 && d > 7))   /* would overflow 128 bits */
            return KL_EINVAL;
        v = (v << 5) | (unsigned)d;
    }
    for (int i = 15; i >= 0; i--) {
        out->b[i] = (uint8_t)(v & 0xff);
        v >>= 8;
    }
    return KL_OK;
}

int kl_id_parse(kl_id_kind kind, const char *s, size_t len, kl_id *out)
{
    size_t n = strlen(prefixes[kind]);
    if (len != n + KL_ID_BODY_LEN || memcmp(s, prefixes[kind], n) != 0)
        return KL_EINVAL;
    return kl_id_parse_body(s + n, len - n, out);
}

/* ---- time ---------------------------------------------------------- */

/* Howard Hinnant's days <-> civil date algorithms, proleptic Gregorian. */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m + (m > 2 ? (unsigned)-3 : 9)) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

void kl_time_format(int64_t ms, char out[KL_TIME_TEXT_LEN + 1])
{
    int64_t secs = ms >= 0 ? ms / 1000 : (ms - 999) / 1000;
    unsigned milli = (unsigned)(ms - secs * 1000);
    int64_t days = secs >= 0 ? secs / 86400 : (secs - 86399) / 86400;
    unsigned sod = (unsigned)(secs - days * 86400);
    int64_t y;
    unsigned m, d;
    civil_from_days(days, &y, &m, &d);
    if (y < 0 || y > 9999)
        y = y < 0 ? 0 : 9999;
    /* Fixed width: the compiler cannot prove the ranges, so print each. */
    out[0] = (char)('0' + (y / 1000) % 10);
    out[1] = (char)('0' + (y / 100) % 10);
    out[2] = (char)('0' + (y / 10) % 10);
    out[3] = (char)('0' + y % 10);
    out[4] = '-';
    out[5] = (char)('0' + m / 10);
    out[6] = (char)('0' + m % 10);
    out[7] = '-';
    out[8] = (char)('0' + d / 10);
    out[9] = (char)('0' + d % 10);
    out[10] = 'T';
    unsigned hh = sod / 3600, mm = sod / 60 % 60, ss = sod % 60;
    out[11] = (char)('0' + hh / 10);
    out[12] = (char)('0' + hh % 10);
    out[13] = ':';
    out[14] = (char)('0' + mm / 10);
    out[15] = (char)('0' + mm % 10);
    out[16] = ':';
    out[17] = (char)('0' + ss / 10);
    out[18] = (char)('0' + ss % 10);
    out[19] = '.';
    out[20] = (char)('0' + milli / 100);
    out[21] = (char)('0' + milli / 10 % 10);
    out[22] = (char)('0' + milli % 10);
    out[23] = 'Z';
    out[24] = '\0';
}

static int64_t floor_div(int64_t a, int64_t b)
{
    return a >= 0 ? a / b : (a - b + 1) / b;
}

int64_t kl_time_hour_start(int64_t ms) { return floor_div(ms, 3600000) * 3600000; }
int64_t kl_time_day_start(int64_t ms) { return floor_div(ms, 86400000) * 86400000; }

int64_t kl_time_month_start(int64_t ms)
{
    int64_t y;
    unsigned m, d;
    civil_from_days(floor_div(ms, 86400000), &y, &m, &d);
    return days_from_civil(y, m, 1) * 86400000;
}

int64_t kl_time_next_month(int64_t ms)
{
    int64_t y;
    unsigned m, d;
    civil_from_days(floor_div(ms, 86400000), &y, &m, &d);
    return days_from_civil(m == 12 ? y + 1 : y, m == 12 ? 1 : m + 1, 1) * 86400000;
}

static int digits(const char *s, size_t n, unsigned *out)
{
    unsigned v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    *out = v;
    return 0;
}

int kl_time_parse(const char *s, size_t len, int64_t *ms_out)
{
    unsigned y, mo, d, h, mi, sec;
    if (len < 20 || s[4] != '-' || s[7] != '-' ||
        (s[10] != 'T' && s[10] != 't') || s[13] != ':' || s[16] != ':')
        return KL_EINVAL;
    if (digits(s, 4, &y) || digits(s + 5, 2, &mo) || digits(s + 8, 2, &d) ||
        digits(s + 11, 2, &h) || digits(s + 14, 2, &mi) ||
        digits(s + 17, 2, &sec))
        return KL_EINVAL;
    static const unsigned mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] ||
        (mo == 2 && d == 29 && !leap) || h > 23 || mi > 59 || sec > 59)
        return KL_EINVAL;
    size_t i = 19;
    unsigned milli = 0;
    if (i < len && s[i] == '.') {
        size_t start = ++i;
        while (i < len && s[i] >= '0' && s[i] <= '9') {
            if (i - start < 3)
                milli = milli * 10 + (unsigned)(s[i] - '0');
            i++;
        }
        size_t nd = i - start;
        if (nd == 0 || nd > 9)
            return KL_EINVAL;
        for (; nd < 3; nd++)
            milli *= 10;
    }
    int64_t offset_min = 0;
    if (i < len && (s[i] == 'Z' || s[i] == 'z')) {
        i++;
    } else if (i + 6 == len && (s[i] == '+' || s[i] == '-') && s[i + 3] == ':') {
        unsigned oh, om;
        if (digits(s + i + 1, 2, &oh) || digits(s + i + 4, 2, &om) ||
            oh > 23 || om > 59)
            return KL_EINVAL;
        offset_min = (int64_t)(oh * 60 + om) * (s[i] == '-' ? -1 : 1);
        i += 6;
    } else {
        return KL_EINVAL;
    }
    if (i != len)
        return KL_EINVAL;
    int64_t days = days_from_civil(y, mo, d);
    int64_t secs = days * 86400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    *ms_out = secs * 1000 + milli;
    return KL_OK;
}

int64_t kl_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
