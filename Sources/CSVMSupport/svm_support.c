#include "svm_support.h"

// Each thread that touches emulated memory is an emulated CPU. Ids are handed
// out once per thread; the TLB model keeps one bit per CPU in an mm's cpumask.
static uint32_t svm_next_cpu = 0;
static _Thread_local int32_t svm_tls_cpu = -1;

int32_t svm_cpu_id(void) {
    int32_t id = svm_tls_cpu;
    if (__builtin_expect(id < 0, 0)) {
        id = (int32_t)__atomic_fetch_add(&svm_next_cpu, 1, __ATOMIC_RELAXED);
        svm_tls_cpu = id;
    }
    return id;
}

