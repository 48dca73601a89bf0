/* A stand-in libnvidia-ml.so for testing the NVML code path without a GPU.
 *
 * Answers from a script file whose path is compiled in (-DSCRIPT_PATH="..."), re-read on every
 * call so a test can change the values between samples. Lines are `key=value`:
 *   driver=550.54.15   cuda=12040   count=2
 *   <i>.name= <i>.uuid= <i>.bus= <i>.total_mib= <i>.used_mib= <i>.util_gpu= <i>.util_mem=
 *   <i>.temp= <i>.power_mw= <i>.limit_mw= <i>.sm_clock= <i>.mem_clock= <i>.fan=
 *   <i>.ecc_corrected= <i>.ecc_uncorrected= <i>.pcie_rx= <i>.pcie_tx=
 *                      a number; `n/a` answers NVML_ERROR_NOT_SUPPORTED, as does a fan left out
 *                      (a passively cooled card); `err:999` answers that NVML return code;
 *                      other numbers left out read 0
 *   <i>.lost=1         every read of the card answers NVML_ERROR_GPU_IS_LOST
 *   <i>.error=999      every read of the card answers this NVML return code (999: UNKNOWN)
 *   <i>.xid=48,79      XIDs reported so far; each is delivered once through nvmlEventSetWait_v2
 * Only the symbols the agent's path calls are exported.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_GPU_IS_LOST 15
#define XID_CRITICAL_ERROR 0x8ULL
#define MAX_CARDS 8

typedef struct { int index; } card_t;
typedef card_t *nvmlDevice_t;
typedef struct { int unused; } *nvmlEventSet_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

static card_t cards[MAX_CARDS] = {{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}};
static int event_set_token;
static int delivered[MAX_CARDS];
static char script[16384];

static void load(void) {
    FILE *f = fopen(SCRIPT_PATH, "r");
    size_t n = 0;
    if (f) {
        n = fread(script, 1, sizeof script - 1, f);
        fclose(f);
    }
    script[n] = 0;
}

/* The value of `key` (or NULL), copied into `out`. */
static const char *get(const char *key, char *out, size_t size) {
    size_t len = strlen(key);
    for (const char *line = script; *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : line + strlen(line)) {
        if (strncmp(line, key, len) == 0 && line[len] == '=') {
            const char *v = line + len + 1;
            size_t m = strcspn(v, "\n");
            if (m >= size) m = size - 1;
            memcpy(out, v, m);
            out[m] = 0;
            return out;
        }
    }
    return NULL;
}

static long long num(int card, const char *field, long long fallback) {
    char key[64], value[64];
    if (card < 0) snprintf(key, sizeof key, "%s", field);
    else snprintf(key, sizeof key, "%d.%s", card, field);
    return get(key, value, sizeof value) ? atoll(value) : fallback;
}

/* A card's numeric reading into *out: NVML_SUCCESS, NVML_ERROR_NOT_SUPPORTED for `n/a` (and for
 * a field left out whose `fallback` is negative), or the code N of `err:N`. */
static int reading(int card, const char *field, long long fallback, unsigned long long *out) {
    char key[64], value[64];
    snprintf(key, sizeof key, "%d.%s", card, field);
    long long v = fallback;
    if (get(key, value, sizeof value)) {
        if (strcmp(value, "n/a") == 0) return NVML_ERROR_NOT_SUPPORTED;
        if (strncmp(value, "err:", 4) == 0) return atoi(value + 4);
        v = atoll(value);
    }
    if (v < 0) return NVML_ERROR_NOT_SUPPORTED;
    *out = (unsigned long long)v;
    return NVML_SUCCESS;
}

/* reading() into an unsigned int. */
static int reading_u(int card, const char *field, long long fallback, unsigned int *out) {
    unsigned long long v = 0;
    int r = reading(card, field, fallback, &v);
    if (r == NVML_SUCCESS) *out = (unsigned int)v;
    return r;
}

static int text(int card, const char *field, char *out, unsigned int size) {
    char key[64];
    snprintf(key, sizeof key, "%d.%s", card, field);
    return get(key, out, size) ? NVML_SUCCESS : NVML_ERROR_NOT_SUPPORTED;
}

/* Loads the script and checks the card: NVML_SUCCESS or the error every read answers. */
static int card_ok(nvmlDevice_t d) {
    load();
    if (!d || d->index < 0 || d->index >= num(-1, "count", 0)) return NVML_ERROR_INVALID_ARGUMENT;
    if (num(d->index, "lost", 0)) return NVML_ERROR_GPU_IS_LOST;
    return (int)num(d->index, "error", NVML_SUCCESS);
}

int nvmlInit_v2(void) { load(); return NVML_SUCCESS; }
int nvmlInitWithFlags(unsigned int flags) { (void)flags; return nvmlInit_v2(); }
int nvmlShutdown(void) { return NVML_SUCCESS; }

int nvmlSystemGetDriverVersion(char *out, unsigned int size) {
    load();
    return get("driver", out, size) ? NVML_SUCCESS : NVML_ERROR_NOT_SUPPORTED;
}
int nvmlSystemGetCudaDriverVersion_v2(int *v) { load(); *v = (int)num(-1, "cuda", 0); return NVML_SUCCESS; }
int nvmlDeviceGetCount_v2(unsigned int *n) { load(); *n = (unsigned int)num(-1, "count", 0); return NVML_SUCCESS; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) {
    load();
    if (i >= MAX_CARDS || i >= num(-1, "count", 0)) return NVML_ERROR_INVALID_ARGUMENT;
    *d = &cards[i];
    return NVML_SUCCESS;
}
int nvmlDeviceGetIndex(nvmlDevice_t d, unsigned int *i) { *i = (unsigned int)d->index; return NVML_SUCCESS; }

#define READ() int r = card_ok(d); if (r) return r; int c = d->index; (void)c;

int nvmlDeviceGetName(nvmlDevice_t d, char *out, unsigned int size) { READ(); return text(c, "name", out, size); }
int nvmlDeviceGetUUID(nvmlDevice_t d, char *out, unsigned int size) { READ(); return text(c, "uuid", out, size); }
int nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *p) {
    READ();
    memset(p, 0, sizeof *p);
    return text(c, "bus", p->busId, sizeof p->busId);
}
int nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    READ();
    unsigned long long total = 0, used = 0;
    if ((r = reading(c, "total_mib", 0, &total)) || (r = reading(c, "used_mib", 0, &used))) return r;
    m->total = total << 20;
    m->used = used << 20;
    m->reserved = 0;
    m->free = m->total - m->used;
    return NVML_SUCCESS;
}
int nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
    READ();
    unsigned int gpu = 0, memory = 0;
    if ((r = reading_u(c, "util_gpu", 0, &gpu)) || (r = reading_u(c, "util_mem", 0, &memory))) return r;
    u->gpu = gpu;
    u->memory = memory;
    return NVML_SUCCESS;
}
int nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *t) { READ(); (void)sensor; return reading_u(c, "temp", 0, t); }
int nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *p) { READ(); return reading_u(c, "power_mw", 0, p); }
int nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t d, unsigned int *p) { READ(); return reading_u(c, "limit_mw", 0, p); }
int nvmlDeviceGetClockInfo(nvmlDevice_t d, int type, unsigned int *mhz) {
    READ();
    /* nvmlClockType_t: 0 graphics, 1 SM, 2 memory */
    return reading_u(c, type == 2 ? "mem_clock" : "sm_clock", 0, mhz);
}
int nvmlDeviceGetFanSpeed_v2(nvmlDevice_t d, unsigned int fan, unsigned int *pct) {
    READ();
    if (fan != 0) return NVML_ERROR_INVALID_ARGUMENT;
    return reading_u(c, "fan", -1, pct);
}
int nvmlDeviceGetTotalEccErrors(nvmlDevice_t d, int type, int counter, unsigned long long *n) {
    READ();
    /* nvmlMemoryErrorType_t: 0 corrected, 1 uncorrected */
    (void)counter;
    return reading(c, type == 0 ? "ecc_corrected" : "ecc_uncorrected", 0, n);
}
int nvmlDeviceGetPcieThroughput(nvmlDevice_t d, int counter, unsigned int *kbps) {
    READ();
    /* nvmlPcieUtilCounter_t: 0 TX, 1 RX */
    return reading_u(c, counter == 0 ? "pcie_tx" : "pcie_rx", 0, kbps);
}
int nvmlDeviceGetSupportedEventTypes(nvmlDevice_t d, unsigned long long *types) { READ(); *types = XID_CRITICAL_ERROR; return NVML_SUCCESS; }
int nvmlEventSetCreate(nvmlEventSet_t *set) { *set = (nvmlEventSet_t)&event_set_token; return NVML_SUCCESS; }
int nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types, nvmlEventSet_t set) { (void)d; (void)types; (void)set; return NVML_SUCCESS; }
int nvmlEventSetFree(nvmlEventSet_t set) { (void)set; return NVML_SUCCESS; }

/* The next undelivered XID of any card, or a timeout. */
int nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
    (void)set; (void)timeout_ms;
    load();
    int count = (int)num(-1, "count", 0);
    for (int c = 0; c < count && c < MAX_CARDS; c++) {
        char key[32], list[256];
        snprintf(key, sizeof key, "%d.xid", c);
        if (!get(key, list, sizeof list)) continue;
        int seen = 0;
        for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ","), seen++) {
            if (seen == delivered[c]) {
                delivered[c]++;
                memset(data, 0, sizeof *data);
                data->device = &cards[c];
                data->eventType = XID_CRITICAL_ERROR;
                data->eventData = (unsigned long long)atoll(tok);
                return NVML_SUCCESS;
            }
        }
    }
    return NVML_ERROR_TIMEOUT;
}
