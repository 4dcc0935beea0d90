/*
 * Checksums and randomness: CRC-32C (Castagnoli) for record framing,
 * SHA-256 for the hash chain and secrets, random bytes for ids and secrets.
 * CRC-32C uses the SSE4.2 instruction where the CPU has it and a table
 * otherwise; both give the same result (tested).
 */
#include "log.h"

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <openssl/sha.h>
#include <string.h>

static uint32_t crc_table[8][256];
static int crc_ready;

static void crc_table_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^
                              crc_table[0][crc_table[t - 1][i] & 0xff];
    __atomic_store_n(&crc_ready, 1, __ATOMIC_RELEASE);
}

static uint32_t crc32c_sw(uint32_t crc, const uint8_t *p, size_t n)
{
    if (!__atomic_load_n(&crc_ready, __ATOMIC_ACQUIRE))
        crc_table_init();   /* idempotent: racing threads write equal data */
    while (n >= 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 |
                             (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
              crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^
              crc_table[3][p[4]] ^ crc_table[2][p[5]] ^
              crc_table[1][p[6]] ^ crc_table[0][p[7]];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>
__attribute__((target("sse4.2")))
static uint64_t crc32c_hw1(uint64_t c, const uint8_t *p, size_t n)
{
    while (n >= 8) {
        uint64_t v;
        __builtin_memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}

/*
 * A crc32 instruction waits for the one before it, so one stream runs at a
 * third of what the unit can do. Buffers go as three streams over
 * consecutive lanes, joined by moving each partial CRC past the lane after
 * it: the CRC register is linear, so that move is a multiplication by
 * x^(8 lane), done by byte with tables made from the CRCs of a lane of
 * zero bytes. Big lanes for big buffers (a snapshot is hundreds of MiB),
 * small ones for records (a few hundred bytes each, a million of them in
 * a log's open): a join costs eight table reads.
 */
enum { LANE = 8192, SMALL_LANE = 64 };
typedef uint32_t shift_table[4][256];
static shift_table lane_shift, small_lane_shift;
static pthread_once_t lane_once = PTHREAD_ONCE_INIT;

static void shift_init(shift_table t, size_t lane)
{
    static const uint8_t zeros[LANE];
    uint32_t bit[32];
    for (int i = 0; i < 32; i++)
        bit[i] = (uint32_t)crc32c_hw1(UINT32_C(1) << i, zeros, lane);
    for (int k = 0; k < 4; k++)
        for (int b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int j = 0; j < 8; j++)
                if ((b >> j) & 1)
                    v ^= bit[8 * k + j];
            t[k][b] = v;
        }
}

static void lane_shift_init(void)
{
    shift_init(lane_shift, LANE);
    shift_init(small_lane_shift, SMALL_LANE);
}

static uint32_t past_lane(const shift_table t, uint32_t c)
{
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^
           t[3][c >> 24];
}

/* The CRC after the 3 * lane bytes at p. */
__attribute__((target("sse4.2")))
static uint64_t three_lanes(uint64_t c0, const uint8_t *p, size_t lane,
                            const shift_table t)
{
    uint64_t c1 = 0, c2 = 0;
    for (size_t i = 0; i < lane; i += 8) {
        uint64_t a, b, c;
        __builtin_memcpy(&a, p + i, 8);
        __builtin_memcpy(&b, p + lane + i, 8);
        __builtin_memcpy(&c, p + 2 * lane + i, 8);
        c0 = _mm_crc32_u64(c0, a);
        c1 = _mm_crc32_u64(c1, b);
        c2 = _mm_crc32_u64(c2, c);
    }
    c0 = past_lane(t, (uint32_t)c0) ^ (uint32_t)c1;
    return past_lane(t, (uint32_t)c0) ^ (uint32_t)c2;
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t n)
{
    uint64_t c0 = crc;
    if (n >= 3 * SMALL_LANE)
        pthread_once(&lane_once, lane_shift_init);
    for (; n >= 3 * LANE; p += 3 * LANE, n -= 3 * LANE)
        c0 = three_lanes(c0, p, LANE, lane_shift);
    for (; n >= 3 * SMALL_LANE; p += 3 * SMALL_LANE, n -= 3 * SMALL_LANE)
        c0 = three_lanes(c0, p, SMALL_LANE, small_lane_shift);
    return (uint32_t)crc32c_hw1(c0, p, n);
}
#endif

uint32_t kl_crc32c(uint32_t crc, const void *data, size_t len)
{
    crc = ~crc;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2"))
        return ~crc32c_hw(crc, data, len);
#endif
    return ~crc32c_sw(crc, data, len);
}

/*
 * Combining: the CRC register is a polynomial over GF(2) (bit-reflected: the
 * top bit is x^0), and running it over n more bytes multiplies it by x^(8n)
 * modulo the Castagnoli polynomial, then adds the bytes' own part. So
 * crc(A B) = crc(A) * x^(8 |B|) + crc(B), the pre- and post-inversion
 * cancelling. x^(8n) is built from the powers x^(2^k) by n's bits.
 */
static uint32_t mul_mod(uint32_t a, uint32_t b)   /* a * b mod P */
{
    uint32_t product = 0;
    for (uint32_t bit = UINT32_C(1) << 31; bit != 0; bit >>= 1) {
        if (a & bit)
            product ^= b;
        b = (b & 1) ? (b >> 1) ^ 0x82f63b78u : b >> 1;     /* b * x */
    }
    return product;
}

uint32_t kl_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b)
{
    uint32_t power = UINT32_C(1) << 23;     /* x^8: one byte (x^k is bit 31 - k) */
    uint32_t shift = UINT32_C(1) << 31;     /* x^0 */
    for (; len_b != 0; len_b >>= 1) {
        if (len_b & 1)
            shift = mul_mod(shift, power);
        power = mul_mod(power, power);
    }
    return mul_mod(crc_a, shift) ^ crc_b;
}

/* Exposed for the unit test that checks both paths agree. */
uint32_t kl_crc32c_portable(uint32_t crc, const void *data, size_t len);
uint32_t kl_crc32c_portable(uint32_t crc, const void *data, size_t len)
{
    return ~crc32c_sw(~crc, data, len);
}

/* OpenSSL 3's SHA256() looks the algorithm up on every call, which costs
 * more than hashing a secret: look it up once (the loop, the replay thread
 * and the tools all hash). */
static EVP_MD *sha256_md;
static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;

static void sha256_fetch(void) { sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL); }

void kl_sha256(const void *data, size_t len, uint8_t out[KL_HASH_LEN])
{
    pthread_once(&sha256_once, sha256_fetch);
    if (sha256_md == NULL || !EVP_Digest(data, len, out, NULL, sha256_md, NULL))
        SHA256(data, len, out);     /* the slow way still gives the hash */
}

void kl_hex(const uint8_t *p, size_t n, char *out)
{
    static const char hx[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hx[p[i] >> 4];
        out[2 * i + 1] = hx[p[i] & 15];
    }
    out[2 * n] = '\0';
}

/* OpenSSL's DRBG checks for a fork on every call (a getpid system call,
 * dear in a VM: it was one per request on the write path), so bytes are
 * drawn from it 4 KiB at a time, per thread, and each handed out once and
 * wiped. keyledger never forks. */
int kl_random(void *out, size_t n)
{
    static _Thread_local uint8_t pool[4096];
    static _Thread_local size_t left;
    if (n > sizeof pool)
        return RAND_bytes(out, (int)n) == 1 ? KL_OK : KL_EIO;
    if (left < n) {
        if (RAND_bytes(pool, sizeof pool) != 1)
            return KL_EIO;
        left = sizeof pool;
    }
    uint8_t *p = pool + sizeof pool - left;
    memcpy(out, p, n);
    OPENSSL_cleanse(p, n);
    left -= n;
    return KL_OK;
}
