#include "svm_support.h"

#include <pthread.h>
#include <linux/membarrier.h>

__attribute__((tls_model("initial-exec"))) _Thread_local svm_cpu_binding_t svm_tls_cpu_binding = { .owner = 0, .fast_owner = 0, .index = -1, .words = 0, .tlb = 0 };
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
        svm_clear_cpu_binding();
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
__attribute__((tls_model("initial-exec"))) _Thread_local void *svm_tls_det_current = 0;

void svm_det_install(svm_det_wait_fn wait, svm_det_wake_fn wake, svm_det_lock_fn lock) {
    svm_det_wait_hook = wait;
    svm_det_wake_hook = wake;
    svm_det_lock_hook = lock;
}
void svm_det_activate(int delta) { __atomic_fetch_add(&svm_det_active_count, (uint32_t)delta, __ATOMIC_SEQ_CST); }
void svm_det_set_current(void *thread) {
    svm_tls_det_current = thread;
    svm_tls_cpu_binding.fast_owner = thread ? 0 : svm_tls_cpu_binding.owner;
}

// A task token: the address of a thread-local word, unique among live threads
// and 8-aligned (the low three bits stay free for a lock word's flags).
static __thread _Alignas(8) uint64_t svm_tls_task;
uintptr_t svm_current_task(void) { return (uintptr_t)&svm_tls_task; }

uint32_t svm_lockdep_count = 0;
__attribute__((tls_model("initial-exec"))) _Thread_local void *svm_tls_lockdep = 0;
void svm_lockdep_enable(int delta) { __atomic_fetch_add(&svm_lockdep_count, (uint32_t)delta, __ATOMIC_SEQ_CST); }
uint32_t svm_lockdep_everywhere_flag = 0;
void svm_lockdep_enable_everywhere(void) {
    uint32_t expected = 0;
    if (__atomic_compare_exchange_n(&svm_lockdep_everywhere_flag, &expected, 1, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        svm_lockdep_enable(1);
}
void svm_lockdep_set_thread(void *stack) { svm_tls_lockdep = stack; }

static void svm_make_key(void) { pthread_key_create(&svm_thread_key, svm_thread_exit); }
static void svm_arm_exit_hook(void) {
    pthread_once(&svm_thread_key_once, svm_make_key);
    pthread_setspecific(svm_thread_key, (void *)1);
}

void svm_bind_cpu(void *owner, int32_t index, uint64_t *words, void *tlb, svm_cpu_unbind_fn unbind) {
    svm_tls_cpu_binding.owner = owner;
    svm_tls_cpu_binding.fast_owner = svm_tls_det_current ? 0 : owner;
    svm_tls_cpu_binding.index = index;
    svm_tls_cpu_binding.words = words;
    svm_tls_cpu_binding.tlb = tlb;
    svm_tls_unbind = unbind;
    svm_arm_exit_hook();
}

void svm_clear_cpu_binding(void) {
    svm_tls_cpu_binding.owner = 0;
    svm_tls_cpu_binding.fast_owner = 0;
    svm_tls_cpu_binding.index = -1;
    svm_tls_cpu_binding.words = 0;
    svm_tls_cpu_binding.tlb = 0;
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

// ---- emulated threads as fibers ----
#include <sys/mman.h>
#include <stdlib.h>
#include <stdio.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// Swift's runtime: the dynamic exclusivity access set of the running task
// moves out of (exit) and into (enter) the thread's, two words of state a
// task. A fiber keeps its accesses the same way, so that one emulated thread
// never sees another's accesses (it would report a false conflict) and each
// finds its own when it runs again.
void swift_task_enterThreadLocalContext(char *state);
void swift_task_exitThreadLocalContext(char *state);
#ifdef SVM_TSAN_ANNOTATE
void *__tsan_get_current_fiber(void);
void *__tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void *fiber);
void __tsan_switch_to_fiber(void *fiber, unsigned flags);
#endif

struct svm_fiber {
    void *sp;                  // saved stack pointer while the fiber does not run
    void *mapping;             // its stack (a guard page first); NULL for an adopted thread
    size_t mapped;
    svm_fiber_entry_fn entry;
    void *arg;
    void *tsan;                // ThreadSanitizer's fiber (NULL without it)
    // The host thread's per-thread state the emulator keeps, while another runs.
    void *det_current;
    void *lockdep;
    svm_cpu_binding_t cpu_binding;
    svm_cpu_unbind_fn unbind;
    int32_t slot;
    uintptr_t exclusivity[2];
#if !defined(__x86_64__)
    ucontext_t context;
#endif
};

__attribute__((visibility("hidden"), used, noreturn))
void svm_fiber_run(svm_fiber_t *f) {
    f->entry(f->arg);
    static const char message[] = "svmemu: a fiber's entry returned (it must switch away at its end)\n";
    (void)!write(2, message, sizeof message - 1);
    abort();
}

#if defined(__x86_64__)
// svm_fiber_swap(save, load): pushes the callee-saved registers and the SSE
// and x87 control words, stores the stack pointer in *save, loads `load` and
// pops the other context's. A new fiber's stack holds a frame whose return
// address is svm_fiber_start, which calls svm_fiber_run(r12).
__attribute__((visibility("hidden"))) void svm_fiber_swap(void **save, void *load);
__attribute__((visibility("hidden"))) void svm_fiber_start(void);
__asm__(
    ".pushsection .text\n"
    ".p2align 4\n"
    ".hidden svm_fiber_swap\n"
    ".globl svm_fiber_swap\n"
    ".type svm_fiber_swap,@function\n"
    "svm_fiber_swap:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size svm_fiber_swap, .-svm_fiber_swap\n"
    ".p2align 4\n"
    ".hidden svm_fiber_start\n"
    ".globl svm_fiber_start\n"
    ".type svm_fiber_start,@function\n"
    "svm_fiber_start:\n"
    "  movq %r12, %rdi\n"
    "  call svm_fiber_run\n"
    "  ud2\n"
    ".size svm_fiber_start, .-svm_fiber_start\n"
    ".popsection\n");
#else
// Elsewhere: the C library's context switch (slower: it saves the signal mask).
static _Thread_local svm_fiber_t *svm_tls_starting_fiber;
static void svm_fiber_start_context(void) { svm_fiber_run(svm_tls_starting_fiber); }
#endif

svm_fiber_t *svm_fiber_create(size_t stack_bytes, svm_fiber_entry_fn entry, void *arg, void *det_current) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t bytes = (stack_bytes + page - 1) & ~(page - 1);
    size_t mapped = bytes + page;
    void *m = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (m == MAP_FAILED) return NULL;
    svm_fiber_t *f = calloc(1, sizeof *f);
    if (!f || mprotect(m, page, PROT_NONE) != 0) {
        free(f);
        munmap(m, mapped);
        return NULL;
    }
    f->mapping = m;
    f->mapped = mapped;
    f->entry = entry;
    f->arg = arg;
    f->det_current = det_current;
    f->cpu_binding = (svm_cpu_binding_t){ .owner = 0, .fast_owner = 0, .index = -1, .words = 0, .tlb = 0 };
    f->slot = -1;
#if defined(__x86_64__)
    uint64_t *sp = (uint64_t *)(((uintptr_t)m + mapped) & ~(uintptr_t)15);
    *--sp = (uint64_t)(uintptr_t)svm_fiber_start;   // popped by ret: svm_fiber_start runs with an aligned stack
    *--sp = 0;                                      // rbp: the end of the frame chain
    *--sp = 0;                                      // rbx
    *--sp = (uint64_t)(uintptr_t)f;                 // r12: svm_fiber_run's argument
    *--sp = 0;                                      // r13
    *--sp = 0;                                      // r14
    *--sp = 0;                                      // r15
    *--sp = 0x1F80ull | (0x037Full << 32);          // MXCSR and the x87 control word: their defaults
    f->sp = sp;
#else
    getcontext(&f->context);
    f->context.uc_stack.ss_sp = (char *)m + page;
    f->context.uc_stack.ss_size = bytes;
    f->context.uc_link = NULL;
    makecontext(&f->context, svm_fiber_start_context, 0);
#endif
#ifdef SVM_TSAN_ANNOTATE
    f->tsan = __tsan_create_fiber(0);
#endif
    return f;
}

svm_fiber_t *svm_fiber_adopt_thread(void) {
    svm_fiber_t *f = calloc(1, sizeof *f);
    if (!f) abort();
#ifdef SVM_TSAN_ANNOTATE
    f->tsan = __tsan_get_current_fiber();
#endif
    return f;
}

void svm_fiber_switch(svm_fiber_t *from, svm_fiber_t *to) {
    from->det_current = svm_tls_det_current;
    from->lockdep = svm_tls_lockdep;
    from->cpu_binding = svm_tls_cpu_binding;
    from->unbind = svm_tls_unbind;
    from->slot = svm_tls_slot;
    svm_tls_det_current = to->det_current;
    svm_tls_lockdep = to->lockdep;
    svm_tls_cpu_binding = to->cpu_binding;
    svm_tls_unbind = to->unbind;
    svm_tls_slot = to->slot;
    swift_task_exitThreadLocalContext((char *)from->exclusivity);
    swift_task_enterThreadLocalContext((char *)to->exclusivity);
#ifdef SVM_TSAN_ANNOTATE
    __tsan_switch_to_fiber(to->tsan, 0);
#endif
#if defined(__x86_64__)
    svm_fiber_swap(&from->sp, to->sp);
#else
    svm_tls_starting_fiber = to;
    swapcontext(&from->context, &to->context);
#endif
}

void svm_fiber_destroy(svm_fiber_t *f) {
    if (!f) return;
#ifdef SVM_TSAN_ANNOTATE
    if (f->mapping) __tsan_destroy_fiber(f->tsan);
#endif
    if (f->mapping) munmap(f->mapping, f->mapped);
    free(f);
}
