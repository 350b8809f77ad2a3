#include "svm_support.h"

#include <pthread.h>
#include <linux/membarrier.h>

__attribute__((tls_model("initial-exec"))) _Thread_local svm_cpu_binding_t svm_tls_cpu_binding = { 0, -1 };
static _Thread_local svm_cpu_unbind_fn svm_tls_unbind = 0;
static pthread_key_t svm_thread_key;
static pthread_once_t svm_thread_key_once = PTHREAD_ONCE_INIT;
static _Thread_local int32_t svm_tls_slot = -1;
static uint64_t svm_slot_words[SVM_THREAD_SLOTS / 64];

// At thread exit: give the emulated CPU back to its machine, the host slot back to the table.
static void svm_thread_exit(void *unused) {
    (void)unused;
    if (svm_tls_cpu_binding.owner && svm_tls_unbind) {
        void *owner = svm_tls_cpu_binding.owner;
        int32_t index = svm_tls_cpu_binding.index;
        svm_tls_cpu_binding.owner = 0;
        svm_tls_cpu_binding.index = -1;
        svm_tls_unbind(owner, index);
    }
    if (svm_tls_slot >= 0) {
        __atomic_fetch_and(&svm_slot_words[svm_tls_slot / 64], ~(1ull << (svm_tls_slot % 64)), __ATOMIC_RELEASE);
        svm_tls_slot = -1;
    }
}
void svm_thread_exit_now(void) { svm_thread_exit(0); }

uint32_t svm_det_active_count = 0;
svm_det_wait_fn svm_det_wait_hook = 0;
svm_det_wake_fn svm_det_wake_hook = 0;
svm_det_lock_fn svm_det_lock_hook = 0;
static _Thread_local void *svm_tls_det_current = 0;

void svm_det_install(svm_det_wait_fn wait, svm_det_wake_fn wake, svm_det_lock_fn lock) {
    svm_det_wait_hook = wait;
    svm_det_wake_hook = wake;
    svm_det_lock_hook = lock;
}
void svm_det_activate(int delta) { __atomic_fetch_add(&svm_det_active_count, (uint32_t)delta, __ATOMIC_SEQ_CST); }
void *svm_det_current(void) { return svm_tls_det_current; }
void svm_det_set_current(void *thread) { svm_tls_det_current = thread; }

// A task token: the address of a thread-local word, unique among live threads
// and 8-aligned (the low three bits stay free for a lock word's flags).
static __thread _Alignas(8) uint64_t svm_tls_task;
uintptr_t svm_current_task(void) { return (uintptr_t)&svm_tls_task; }

uint32_t svm_lockdep_count = 0;
static _Thread_local void *svm_tls_lockdep = 0;
void svm_lockdep_enable(int delta) { __atomic_fetch_add(&svm_lockdep_count, (uint32_t)delta, __ATOMIC_SEQ_CST); }
uint32_t svm_lockdep_everywhere_flag = 0;
void svm_lockdep_enable_everywhere(void) {
    uint32_t expected = 0;
    if (__atomic_compare_exchange_n(&svm_lockdep_everywhere_flag, &expected, 1, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        svm_lockdep_enable(1);
}
void *svm_lockdep_thread(void) { return svm_tls_lockdep; }
void svm_lockdep_set_thread(void *stack) { svm_tls_lockdep = stack; }

static void svm_make_key(void) { pthread_key_create(&svm_thread_key, svm_thread_exit); }
static void svm_arm_exit_hook(void) {
    pthread_once(&svm_thread_key_once, svm_make_key);
    pthread_setspecific(svm_thread_key, (void *)1);
}

void svm_bind_cpu(void *owner, int32_t index, svm_cpu_unbind_fn unbind) {
    svm_tls_cpu_binding.owner = owner;
    svm_tls_cpu_binding.index = index;
    svm_tls_unbind = unbind;
    svm_arm_exit_hook();
}

void svm_clear_cpu_binding(void) {
    svm_tls_cpu_binding.owner = 0;
    svm_tls_cpu_binding.index = -1;
}

int32_t svm_thread_slot(void) {
    if (__builtin_expect(svm_tls_slot >= 0, 1)) return svm_tls_slot;
    for (int w = 0; w < SVM_THREAD_SLOTS / 64; w++) {
        uint64_t v = __atomic_load_n(&svm_slot_words[w], __ATOMIC_RELAXED);
        while (~v) {
            int bit = __builtin_ctzll(~v);
            if (__atomic_compare_exchange_n(&svm_slot_words[w], &v, v | (1ull << bit), false,
                                            __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
                svm_tls_slot = w * 64 + bit;
                svm_arm_exit_hook();
                return svm_tls_slot;
            }
        }
    }
    return -1;
}

static int svm_membarrier_state = 0; // 0 unknown, 1 available, 2 not
bool svm_membarrier_available(void) {
    int st = __atomic_load_n(&svm_membarrier_state, __ATOMIC_ACQUIRE);
    if (st == 0) {
        long q = syscall(SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
        bool ok = q > 0 && (q & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
                  syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
        st = ok ? 1 : 2;
        __atomic_store_n(&svm_membarrier_state, st, __ATOMIC_RELEASE);
    }
    return st == 1;
}

void svm_membarrier(void) {
    if (svm_membarrier_available()) {
        syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
    } else {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
}
