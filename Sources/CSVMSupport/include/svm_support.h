// Primitives of the emulated kernel that Swift cannot express on raw, pfn-indexed
// memory without per-object allocation: atomics on plain words, futex sleeps and
// wake-ups on those words, a three-state futex mutex (the page-table locks and
// the zone locks), streaming copies and the x86 cycle counter. All static
// inline: the Swift optimizer sees through them. The clock, sleeps and
// mappings are Swift, in SVMEmu/Host.
#ifndef SVM_SUPPORT_H
#define SVM_SUPPORT_H

#include <stdint.h>
#include <stdbool.h>
#include <string.h>
#include <time.h>
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sched.h>
#include <linux/futex.h>

// ---- ThreadSanitizer annotations ----
// The emulator's own locks (the futex mutex below, the folio lock bit, the
// Swift Mutex boxes) order memory through futexes and atomics that
// ThreadSanitizer does not model as locks. Each lock tells it what it orders:
// an acquire after taking, a release before dropping, on the lock's address.
// Compiled in only under the sanitizer (`make tsan` also defines SVM_TSAN, for
// a clang importer that does not report the feature); nothing otherwise.
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SVM_TSAN_ANNOTATE 1
#endif
#endif
#if defined(SVM_TSAN) || defined(__SANITIZE_THREAD__)
#define SVM_TSAN_ANNOTATE 1
#endif
#ifdef SVM_TSAN_ANNOTATE
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
static inline void svm_tsan_acquire(const void *addr) { __tsan_acquire((void *)addr); }
static inline void svm_tsan_release(const void *addr) { __tsan_release((void *)addr); }
static inline bool svm_tsan_enabled(void) { return true; }
// An emulated CPU's loads and stores to emulated memory are the emulated
// program's, not the emulator's: racing CPUs are the program's business (and
// the stale-entry checker's), so the sanitizer does not watch them.
void AnnotateIgnoreReadsBegin(const char *f, int l);
void AnnotateIgnoreReadsEnd(const char *f, int l);
void AnnotateIgnoreWritesBegin(const char *f, int l);
void AnnotateIgnoreWritesEnd(const char *f, int l);
static inline void svm_tsan_ignore_begin(void) { AnnotateIgnoreReadsBegin("", 0); AnnotateIgnoreWritesBegin("", 0); }
static inline void svm_tsan_ignore_end(void) { AnnotateIgnoreWritesEnd("", 0); AnnotateIgnoreReadsEnd("", 0); }
#else
static inline void svm_tsan_acquire(const void *addr) { (void)addr; }
static inline void svm_tsan_release(const void *addr) { (void)addr; }
static inline bool svm_tsan_enabled(void) { return false; }
static inline void svm_tsan_ignore_begin(void) {}
static inline void svm_tsan_ignore_end(void) {}
#endif

// ---- 32-bit atomics (flags words, lock words, counters) ----
static inline uint32_t svm_load32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t svm_load32_relaxed(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void svm_store32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t svm_or32(uint32_t *p, uint32_t v) { return __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL); }
static inline uint32_t svm_and32(uint32_t *p, uint32_t v) { return __atomic_fetch_and(p, v, __ATOMIC_ACQ_REL); }
static inline bool svm_cas32(uint32_t *p, uint32_t *expected, uint32_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline int32_t svm_add32(int32_t *p, int32_t v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
static inline int32_t svm_loadi32(const int32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void svm_storei32(int32_t *p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline bool svm_casi32(int32_t *p, int32_t *expected, int32_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

// ---- 64-bit atomics (page-table entries, statistics) ----
static inline uint64_t svm_load64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void svm_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint64_t svm_load64_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void svm_store64_relaxed(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint64_t svm_xchg64(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }
static inline uint64_t svm_or64(uint64_t *p, uint64_t v) { return __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL); }
static inline uint64_t svm_and64(uint64_t *p, uint64_t v) { return __atomic_fetch_and(p, v, __ATOMIC_ACQ_REL); }
static inline bool svm_cas64(uint64_t *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline uint64_t svm_add64(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
static inline uint64_t svm_add64_seqcst(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
static inline void svm_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void svm_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

// ---- deterministic scheduling hooks ----
// While a deterministic scheduler runs (SVMEmu/Schedule/DeterministicScheduler)
// svm_det_active() is true and every futex wait and wake, and every acquire and
// release of the futex mutex, goes through the scheduler's hooks first. A hook
// returns a negative value when the calling thread is not one of its emulated
// threads; the caller then does what it does without a scheduler. Without a
// scheduler each hook site costs one load and one predictable branch.
typedef int (*svm_det_wait_fn)(uint32_t *word, uint32_t expected, uint64_t timeout_ns);
typedef int (*svm_det_wake_fn)(uint32_t *word, int count);
// event: SVM_DET_BEFORE_ACQUIRE, SVM_DET_ACQUIRED, SVM_DET_RELEASED, with
// SVM_DET_SLEEPING or'ed in for a sleeping lock (a mutex, an rwsem, the folio
// lock): holding one leaves the thread preemptible.
typedef void (*svm_det_lock_fn)(const void *lock, int event);
enum { SVM_DET_BEFORE_ACQUIRE = 0, SVM_DET_ACQUIRED = 1, SVM_DET_RELEASED = 2, SVM_DET_SLEEPING = 0x100 };
extern uint32_t svm_det_active_count;
extern svm_det_wait_fn svm_det_wait_hook;
extern svm_det_wake_fn svm_det_wake_hook;
extern svm_det_lock_fn svm_det_lock_hook;
// Installs the hooks (once, before the first activation).
void svm_det_install(svm_det_wait_fn wait, svm_det_wake_fn wake, svm_det_lock_fn lock);
// One more (delta 1) or one fewer (delta -1) scheduler running.
void svm_det_activate(int delta);
static inline bool svm_det_active(void) {
    return __builtin_expect(__atomic_load_n(&svm_det_active_count, __ATOMIC_RELAXED) != 0, 0);
}
// The calling thread's emulated-thread record (an unretained object), or NULL.
extern _Thread_local void *svm_tls_det_current __attribute__((tls_model("initial-exec")));
static inline void *svm_det_current(void) { return svm_tls_det_current; }
void svm_det_set_current(void *thread);
// The calling thread's task token: nonzero, 8-aligned, unique among live
// threads (a kernel mutex's owner field holds it, as the kernel's holds a
// task_struct pointer).
uintptr_t svm_current_task(void);
// Runs the thread-exit work now (gives back the emulated CPU and the host slot),
// so that an emulated thread does it while it still runs alone, before the
// scheduler moves on.
void svm_thread_exit_now(void);
// Lock-order validation (SVMEmu/Schedule/LockOrder): on while the count is
// non-zero; each classed lock's acquire and release then reports to it.
extern uint32_t svm_lockdep_count;
static inline bool svm_lockdep_enabled(void) {
    return __builtin_expect(__atomic_load_n(&svm_lockdep_count, __ATOMIC_RELAXED) != 0, 0);
}
void svm_lockdep_enable(int delta);
// Validation for every thread of the process, for good (the test machine).
extern uint32_t svm_lockdep_everywhere_flag;
static inline bool svm_lockdep_everywhere(void) {
    return __atomic_load_n(&svm_lockdep_everywhere_flag, __ATOMIC_RELAXED) != 0;
}
void svm_lockdep_enable_everywhere(void);
// The calling thread's held-lock stack (an unretained object), or NULL.
extern _Thread_local void *svm_tls_lockdep __attribute__((tls_model("initial-exec")));
static inline void *svm_lockdep_thread(void) { return svm_tls_lockdep; }
void svm_lockdep_set_thread(void *stack);
static inline void svm_det_lock_event(const void *lock, int event) {
    if (svm_det_active()) svm_det_lock_hook(lock, event);
}

// ---- emulated threads as fibers (the deterministic scheduler's engine) ----
// A fiber is a stack and a saved register set: the scheduler's emulated
// threads all run on one host thread and pass control to each other by
// switching stacks in user space (svm_fiber_switch, tens of nanoseconds),
// never through the host kernel. What a host thread keeps per thread and the
// emulator relies on travels with each fiber: the emulated-thread record
// (svm_det_current), the lock-order stack (svm_lockdep_thread), the CPU
// binding, the host thread slot, Swift's dynamic exclusivity access set
// (swift_task_exit/enterThreadLocalContext, as Swift concurrency swaps it for
// tasks), and ThreadSanitizer's notion of the running thread (its fiber API).
typedef struct svm_fiber svm_fiber_t;
typedef void (*svm_fiber_entry_fn)(void *arg);
// A fiber that runs entry(arg) when first switched to, on a stack of
// stack_bytes (plus a guard page below it); while it runs, svm_det_current()
// is det_current. entry must never return (it switches away for good at its
// end). NULL when the host refuses the memory.
svm_fiber_t *svm_fiber_create(size_t stack_bytes, svm_fiber_entry_fn entry, void *arg, void *det_current);
// The calling host thread's own context as a fiber (no stack of its own), to
// switch away from and back to. Destroy it on the same thread when done.
svm_fiber_t *svm_fiber_adopt_thread(void);
// Saves the calling context in `from` (which must be the running fiber) and
// resumes `to`; returns when some fiber switches back to `from`.
void svm_fiber_switch(svm_fiber_t *from, svm_fiber_t *to);
// Frees a fiber and its stack. Only for a fiber that will never run again
// and whose stack nothing points into (one whose entry reached its end).
void svm_fiber_destroy(svm_fiber_t *fiber);

// ---- futex ----
// Sleep while *word == expected, at most timeout_ns (0 = no limit). Returns 0 when
// woken (or spuriously), ETIMEDOUT when the time ran out, EAGAIN when *word had
// already changed. Under a deterministic scheduler an emulated thread's wait and
// wake are the scheduler's (virtual time; a timeout is virtual too).
static inline int svm_futex_wait_raw(uint32_t *word, uint32_t expected, uint64_t timeout_ns);
static inline int svm_futex_wake_raw(uint32_t *word, int count);
static inline int svm_futex_wait(uint32_t *word, uint32_t expected, uint64_t timeout_ns) {
    if (svm_det_active()) {
        int r = svm_det_wait_hook(word, expected, timeout_ns);
        if (r >= 0) return r;
    }
    return svm_futex_wait_raw(word, expected, timeout_ns);
}
static inline int svm_futex_wake(uint32_t *word, int count) {
    if (svm_det_active()) {
        int r = svm_det_wake_hook(word, count);
        if (r >= 0) return r;
    }
    return svm_futex_wake_raw(word, count);
}
// The host's futex, never the scheduler's (the wait for the scheduler's run to end).
static inline int svm_futex_wait_raw(uint32_t *word, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ns) { ts.tv_sec = (time_t)(timeout_ns / 1000000000ull); ts.tv_nsec = (long)(timeout_ns % 1000000000ull); tsp = &ts; }
    long r = syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, expected, tsp, NULL, 0);
    return r == 0 ? 0 : errno;
}
static inline int svm_futex_wake_raw(uint32_t *word, int count) {
    return (int)syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, count, NULL, NULL, 0);
}

// ---- three-state futex mutex: 0 free, 1 locked, 2 locked with waiters ----
// Used for split page-table locks, PMD locks and zone locks: a word of raw memory
// each, 2-3 ns uncontended, a failed trylock is one CAS (no system call).
// Under a deterministic scheduler acquire and release are scheduling points and
// the scheduler records the holder (for deadlock reports); no spinning then.
static inline bool svm_mutex_trylock(uint32_t *m) {
    svm_det_lock_event(m, SVM_DET_BEFORE_ACQUIRE);
    uint32_t e = 0;
    bool taken = __atomic_compare_exchange_n(m, &e, 1, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
    if (taken) { svm_tsan_acquire(m); svm_det_lock_event(m, SVM_DET_ACQUIRED); }
    return taken;
}
static inline void svm_mutex_lock(uint32_t *m) {
    uint32_t c = 0;
    if (svm_det_active()) {
        svm_det_lock_hook(m, SVM_DET_BEFORE_ACQUIRE);
        if (!__atomic_compare_exchange_n(m, &c, 1, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
            c = __atomic_exchange_n(m, 2, __ATOMIC_ACQUIRE);
            while (c != 0) {
                svm_futex_wait(m, 2, 0);
                c = __atomic_exchange_n(m, 2, __ATOMIC_ACQUIRE);
            }
        }
        svm_tsan_acquire(m);
        svm_det_lock_hook(m, SVM_DET_ACQUIRED);
        return;
    }
    if (__atomic_compare_exchange_n(m, &c, 1, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) { svm_tsan_acquire(m); return; }
    for (int spin = 0; spin < 64; spin++) {
        svm_cpu_relax();
        c = 0;
        if (__atomic_load_n(m, __ATOMIC_RELAXED) == 0 &&
            __atomic_compare_exchange_n(m, &c, 1, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) { svm_tsan_acquire(m); return; }
    }
    if (c != 2) c = __atomic_exchange_n(m, 2, __ATOMIC_ACQUIRE);
    while (c != 0) {
        svm_futex_wait(m, 2, 0);
        c = __atomic_exchange_n(m, 2, __ATOMIC_ACQUIRE);
    }
    svm_tsan_acquire(m);
}
static inline void svm_mutex_unlock(uint32_t *m) {
    svm_tsan_release(m);
    if (__atomic_exchange_n(m, 0, __ATOMIC_RELEASE) == 2) svm_futex_wake(m, 1);
    svm_det_lock_event(m, SVM_DET_RELEASED);
}
static inline bool svm_mutex_is_locked(const uint32_t *m) { return __atomic_load_n(m, __ATOMIC_RELAXED) != 0; }

// ---- bytes ----
static inline void svm_memcpy(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
static inline void svm_memset(void *dst, int c, size_t n) { memset(dst, c, n); }
static inline int svm_memcmp(const void *a, const void *b, size_t n) { return memcmp(a, b, n); }
// A copy with non-temporal (streaming) stores, as a DMA engine writes memory
// without pulling the destination into the CPU caches, and non-temporal
// prefetches (PREFETCHNTA) of the source SVM_COPY_PREFETCH_AHEAD bytes ahead,
// as a DMA engine reads it without filling them either: the page metadata a
// migration touches before and after a copy stays cached. Measured
// 2026-12-07 (Docs/benchmarks.md): the 256 MiB streaming copy 20.5 -> 22.7
// GB/s, the 2 MiB migration round trip 17.5 -> 20.3 GB/s. For 64-byte
// multiples on 16-byte aligned buffers (page frames); anything else falls
// back to memcpy.
#if defined(__x86_64__)
#include <emmintrin.h>
#include <xmmintrin.h>
#ifndef SVM_COPY_PREFETCH_AHEAD
#define SVM_COPY_PREFETCH_AHEAD 2048
#endif
// The copy without a closing fence, when the caller knows the next copy's
// source (`next`, `next_n` bytes; NULL when there is none), as a DMA engine
// walking a scatter-gather list reads the next descriptor's source while it
// finishes this one. Prefetches stay inside the source up to its last
// SVM_COPY_PREFETCH_AHEAD bytes; over those, where the source has nothing
// left to prefetch, they run on into the first bytes of `next` (never past
// `next_n`). The host's prefetchers stop at a 4 KiB page boundary, so without
// it the first half of every 4 KiB source is read on demand.
static inline void svm_copy_stream_unfenced_then(void *dst, const void *src, size_t n,
                                                 const void *next, size_t next_n) {
    if ((((uintptr_t)dst | (uintptr_t)src) & 15) || (n & 63)) { memcpy(dst, src, n); return; }
    __m128i *d = (__m128i *)dst;
    const __m128i *s = (const __m128i *)src;
    size_t prefetched = n > SVM_COPY_PREFETCH_AHEAD ? (n - SVM_COPY_PREFETCH_AHEAD) / 16 : 0;
    size_t ahead = !next ? 0 : next_n < SVM_COPY_PREFETCH_AHEAD ? next_n : SVM_COPY_PREFETCH_AHEAD;
    for (size_t i = 0; i < n / 16; i += 4) {
        if (i < prefetched) _mm_prefetch((const char *)(s + i) + SVM_COPY_PREFETCH_AHEAD, _MM_HINT_NTA);
        else if ((i - prefetched) * 16 < ahead) _mm_prefetch((const char *)next + (i - prefetched) * 16, _MM_HINT_NTA);
        __m128i a = _mm_load_si128(s + i), b = _mm_load_si128(s + i + 1);
        __m128i c = _mm_load_si128(s + i + 2), e = _mm_load_si128(s + i + 3);
        _mm_stream_si128(d + i, a); _mm_stream_si128(d + i + 1, b);
        _mm_stream_si128(d + i + 2, c); _mm_stream_si128(d + i + 3, e);
    }
}
// The copy without a closing fence: a batch of these followed by one
// svm_store_fence() costs one fence per batch, like one DMA completion.
// Prefetches stay inside the source: a 4 KiB copy's next frame is rarely the
// next copy's source.
static inline void svm_copy_stream_unfenced(void *dst, const void *src, size_t n) {
    svm_copy_stream_unfenced_then(dst, src, n, 0, 0);
}
// Orders every earlier streaming store of this thread before later stores.
static inline void svm_store_fence(void) { _mm_sfence(); }
static inline void svm_copy_stream(void *dst, const void *src, size_t n) {
    svm_copy_stream_unfenced(dst, src, n);
    svm_store_fence();
}
#else
static inline void svm_copy_stream(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
static inline void svm_copy_stream_unfenced(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
static inline void svm_copy_stream_unfenced_then(void *dst, const void *src, size_t n, const void *next, size_t next_n) {
    (void)next; (void)next_n; memcpy(dst, src, n);
}
static inline void svm_store_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#endif

// A compiler barrier so a benchmark's copy is not optimised away.
static inline void svm_escape(void *p) { __asm__ __volatile__("" : : "g"(p) : "memory"); }


// ---- which emulated CPU a thread runs on ----
// The emulated machine owns its CPUs (SVMEmu's CPUSet): a thread takes a CPU
// slot of a machine when it first accesses memory there and gives it back when
// it exits (or moves to another machine). This is the machine's "current CPU"
// register, nothing more: no kernel state travels through it.
typedef void (*svm_cpu_unbind_fn)(void *owner, int32_t index);
// Beside the owner and the index, the binding keeps where that CPU's state
// is (its words and its TLB), so the access fast path finds them in the
// thread's own block without arithmetic. `fast_owner` is the owner while the
// thread runs on its own, NULL while a deterministic scheduler runs it (its
// accesses are scheduling points): the fast path's one test covers both.
typedef struct { void *owner; void *fast_owner; int32_t index; uint64_t *words; void *tlb; } svm_cpu_binding_t;
extern _Thread_local svm_cpu_binding_t svm_tls_cpu_binding __attribute__((tls_model("initial-exec")));
// The CPU index this thread holds on `owner`, or -1.
static inline int32_t svm_bound_cpu(const void *owner) {
    return svm_tls_cpu_binding.owner == owner ? svm_tls_cpu_binding.index : -1;
}
// Whether the access fast path may use the CPU this thread holds on `owner`
// (it holds one there and no deterministic scheduler runs it); then
// svm_bound_cpu_words(), svm_bound_cpu_index() and svm_bound_cpu_tlb() are
// that CPU's.
static inline bool svm_fast_cpu_is(const void *owner) { return svm_tls_cpu_binding.fast_owner == owner; }
// The words of the CPU this thread holds (NULL when it holds none).
static inline uint64_t *svm_bound_cpu_words(void) { return svm_tls_cpu_binding.words; }
static inline int32_t svm_bound_cpu_index(void) { return svm_tls_cpu_binding.index; }
static inline void *svm_bound_cpu_tlb(void) { return svm_tls_cpu_binding.tlb; }
static inline void *svm_bound_cpu_owner(void) { return svm_tls_cpu_binding.owner; }
// Records the binding (CPU `index` of `owner`, whose words and TLB are
// `words` and `tlb`); `unbind(owner, index)` runs when the thread exits.
void svm_bind_cpu(void *owner, int32_t index, uint64_t *words, void *tlb, svm_cpu_unbind_fn unbind);
// Forgets the binding (the caller gave the slot back itself).
void svm_clear_cpu_binding(void);

// ---- host thread slots ----
// A small index unique among the live threads that asked for one (recycled at
// thread exit): per-thread scratch of host-side helpers such as copy engines.
// -1 when all SVM_THREAD_SLOTS are taken.
#define SVM_THREAD_SLOTS 4096
int32_t svm_thread_slot(void);

// ---- asymmetric fences ----
// A full memory barrier on every running thread of the process
// (membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)), so that the other side of a
// Dekker-style handshake needs only a compiler barrier. Returns false when the
// host does not offer it; callers then fence on both sides.
bool svm_membarrier_available(void);
void svm_membarrier(void);
static inline void svm_compiler_barrier(void) { __asm__ __volatile__("" ::: "memory"); }

// ---- cycle counter for phase timing (cheap: ~7 ns vs ~20 ns for clock_gettime) ----
// x86-64 only; HostClock.ticks() reads the clock elsewhere.
#if defined(__x86_64__)
static inline uint64_t svm_rdtsc(void) { return __builtin_ia32_rdtsc(); }
#endif
#endif // SVM_SUPPORT_H
