// The native kernels' thread pool (prad/kernels): parallel_for over work items, chunks handed out
// dynamically, the calling thread working too.
//
// Why not OpenMP: with OMP_WAIT_POLICY=PASSIVE (which the server needs: spinning OpenMP threads
// collapse when a core is busy) every parallel region wakes a sleeping thread, and a wake-up can
// cost more than a small region's work; a decode step opens ~5 regions per layer (docs/design.md
// has the measurements). These workers spin for SPIN_US after each job, so the next region of the
// same step finds them awake, and then sleep; and since chunks are claimed one at a time, a worker
// that wakes late (or is descheduled) only means the others take more chunks: no one waits for it
// but for the chunk it holds; a job offered to a worker that has not taken it when the caller runs
// out of chunks is withdrawn. One job runs at a time: a second caller meanwhile runs its job alone
// on its own thread.
// After fork() the child starts a fresh pool (the parent's workers do not exist there; its offers
// to them would only be withdrawn).
#pragma once
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#ifdef __x86_64__
#include <immintrin.h>
#endif

namespace prad {

inline void cpu_relax() {
#ifdef __x86_64__
    _mm_pause();
#else
    std::this_thread::yield();
#endif
}

// One parallel_for: items [0, items) in chunks of `chunk`, claimed through `next`.
struct Job {
    void (*body)(const void *ctx, int64_t begin, int64_t end);
    const void *ctx;
    int64_t items, chunk;
    std::atomic<int64_t> next{0};
    std::atomic<int> pending{0};  // helpers not yet done

    void work() {
        for (int64_t begin; (begin = next.fetch_add(chunk, std::memory_order_relaxed)) < items;)
            body(ctx, begin, std::min(items, begin + chunk));
    }
};

class Pool {
  public:
    // Runs `job` on the calling thread and up to threads - 1 workers; returns when all is done.
    void run(Job &job, int threads) {
        std::unique_lock<std::mutex> one_job(caller_, std::try_to_lock);
        const int64_t chunks = (job.items + job.chunk - 1) / job.chunk;
        const int helpers = int(std::min<int64_t>(threads - 1, chunks - 1));
        if (!one_job || helpers <= 0) {
            job.work();
            return;
        }
        spawn(helpers);
        job.pending.store(helpers, std::memory_order_relaxed);
        for (int i = 0; i < helpers; i++) slots_[i]->offer.store(&job, std::memory_order_seq_cst);
        if (sleepers_.load(std::memory_order_seq_cst) > 0) {
            std::lock_guard<std::mutex> lock(sleep_mutex_);
            wake_.notify_all();
        }
        job.work();
        // A helper that has not taken its offer yet (asleep, or not scheduled) is not waited for.
        for (int i = 0; i < helpers; i++) {
            Job *expected = &job;
            if (slots_[i]->offer.compare_exchange_strong(expected, nullptr, std::memory_order_acq_rel))
                job.pending.fetch_sub(1, std::memory_order_relaxed);
        }
        for (uint64_t spins = 0; job.pending.load(std::memory_order_acquire) > 0; spins++) {
            if (spins < (1u << 14)) cpu_relax();
            else std::this_thread::yield();  // a helper was descheduled mid-chunk
        }
    }

  private:
    struct alignas(64) Slot {  // one worker's mailbox, a cache line of its own
        std::atomic<Job *> offer{nullptr};  // a job for this worker; taken (or withdrawn) by exchange
    };

    void spawn(int helpers) {
        while (int(slots_.size()) < helpers) {
            slots_.push_back(std::make_unique<Slot>());
            Slot *slot = slots_.back().get();
            std::thread([this, slot] { serve(*slot); }).detach();  // lives as long as the process
        }
    }

    void serve(Slot &slot) {
        for (;;) {
            Job *job = await_offer(slot);
            // taken, unless withdrawn meanwhile (the caller finished every chunk first)
            if (job == nullptr || !slot.offer.compare_exchange_strong(job, nullptr, std::memory_order_acq_rel))
                continue;
            job->work();
            job->pending.fetch_sub(1, std::memory_order_release);
        }
    }

    // Spins up to SPIN_US for an offer, then sleeps until one comes.
    Job *await_offer(Slot &slot) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us());
        for (int i = 0;; i++) {
            if (Job *job = slot.offer.load(std::memory_order_acquire)) return job;
            cpu_relax();
            if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) break;
        }
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, [&] { return slot.offer.load(std::memory_order_seq_cst) != nullptr; });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        return slot.offer.load(std::memory_order_acquire);
    }

    static int64_t spin_us() {
        static const int64_t value = [] {
            const char *env = std::getenv("PRAD_KERNEL_SPIN_US");
            return env ? std::max<int64_t>(0, std::atoll(env)) : int64_t(SPIN_US);
        }();
        return value;
    }

    // Long enough to bridge the gaps between one decode step's parallel regions (element-wise
    // work and Python, tens of us), short enough that an idle server's workers soon sleep.
    static constexpr int SPIN_US = 200;

    std::mutex caller_;
    std::vector<std::unique_ptr<Slot>> slots_;
    std::mutex sleep_mutex_;
    std::condition_variable wake_;
    std::atomic<int> sleepers_{0};
};

inline std::atomic<Pool *> &pool_instance() {
    static std::atomic<Pool *> instance{nullptr};
    return instance;
}

inline Pool &pool() {
    static std::once_flag registered;
    std::call_once(registered, [] {
        // the child of a fork has none of the parent's workers: it starts a pool of its own (the
        // parent's is leaked there, never touched)
        pthread_atfork(nullptr, nullptr, [] { pool_instance().store(nullptr); });
    });
    Pool *p = pool_instance().load(std::memory_order_acquire);
    if (p == nullptr) {
        Pool *fresh = new Pool();  // never deleted once in use: its workers are detached threads
        if (pool_instance().compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
        delete fresh;  // another thread's pool won (no workers were started on this one)
    }
    return *p;
}

// body(begin, end) over [0, items) in chunks of `chunk` items, on up to `threads` threads.
template <typename F>
void parallel_for(int threads, int64_t items, int64_t chunk, const F &body) {
    if (items <= 0) return;
    Job job;
    job.body = [](const void *ctx, int64_t begin, int64_t end) { (*static_cast<const F *>(ctx))(begin, end); };
    job.ctx = &body;
    job.items = items;
    job.chunk = std::max<int64_t>(1, chunk);
    if (threads <= 1) {
        job.work();
        return;
    }
    pool().run(job, threads);
}

}  // namespace prad
