// A team of helper threads that never holds up the thread that calls it.
//
// The op used torch's OpenMP pool (at::parallel_for): a fork and a join per call, 48-120 calls a
// decode step. The join waits for every thread of the team, also one that has not even started
// because another job holds its core; on a shared 2-core machine each call then waited a
// scheduler time slice, and two threads ran a decode step 6x slower than one (docs/design.md).
// Here the calling thread works through the tasks itself and helpers join in when they get a
// core: the caller waits only for tasks a helper has claimed and not yet finished, never for a
// helper that is late. A task is run by exactly one thread, so results do not depend on which.
//
// The claim word packs (generation, task count, next task) into one atomic, so a helper that
// wakes late for an old generation can never claim a task of a newer one under the old count;
// a claimed task's inputs stay valid because the caller returns only when all are finished.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

namespace lora_team {

class Team {
 public:
  using Task = void (*)(const void* context, int64_t index);
  static constexpr int64_t kMaxTasks = (1 << 24) - 1;

  // The process's team; never destroyed (its detached threads outlive static destructors).
  static Team& instance() {
    static Team* team = new Team;
    return *team;
  }

  // task(context, i) for every i < count, on this thread and up to `helpers` helper threads (more
  // are started when needed). A second caller while one runs does its tasks alone.
  void run(Task task, const void* context, int64_t count, int helpers) {
    std::unique_lock<std::mutex> caller(busy_, std::try_to_lock);
    if (helpers <= 0 || count <= 1 || !caller.owns_lock()) {
      for (int64_t i = 0; i < count; ++i) task(context, i);
      return;
    }
    grow(helpers);
    task_ = task;
    context_ = context;
    wanted_.store(helpers, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    generation_ = (generation_ + 1) & 0xffff;
    ticket_.store(static_cast<uint64_t>(generation_) << 48 | static_cast<uint64_t>(count) << 24,
                  std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      published_ = generation_;
    }
    wake_.notify_all();
    int64_t mine = 0, index;
    while (claim(generation_, index)) {
      task(context, index);
      ++mine;
    }
    done_.fetch_add(mine, std::memory_order_acq_rel);
    for (int spins = 0; done_.load(std::memory_order_acquire) != count; ++spins) {
      if (spins < 1000) relax();
      else std::this_thread::yield();
    }
  }

 private:
  static void relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  bool claim(uint32_t generation, int64_t& index) {
    uint64_t word = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const int64_t next = word & kMaxTasks, count = (word >> 24) & kMaxTasks;
      if ((word >> 48) != generation || next >= count) return false;
      if (ticket_.compare_exchange_weak(word, word + 1, std::memory_order_acq_rel)) {
        index = next;
        return true;
      }
    }
  }

  void grow(int helpers) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (started_ < helpers) std::thread(&Team::helper, this, started_++).detach();
  }

  // Spin a little for the next generation (the calls of one step come a few hundred microseconds
  // apart), then sleep; take tasks while there are.
  void helper(int id) {
    uint32_t seen = 0;
    for (;;) {
      uint32_t generation = ticket_.load(std::memory_order_acquire) >> 48;
      for (int spins = 0; generation == seen && spins < 2000; ++spins) {
        relax();
        generation = ticket_.load(std::memory_order_acquire) >> 48;
      }
      if (generation == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return published_ != seen; });
        generation = published_;
      }
      seen = generation;
      if (id >= wanted_.load(std::memory_order_relaxed)) continue;
      int64_t index;
      while (claim(generation, index)) {  // task_ and context_ are this generation's once a claim succeeds
        task_(context_, index);
        done_.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  }

  std::atomic<uint64_t> ticket_{0};  // generation (16 bits) | task count (24) | next task (24)
  std::atomic<int64_t> done_{0};
  std::atomic<int> wanted_{0};
  Task task_ = nullptr;
  const void* context_ = nullptr;
  uint32_t generation_ = 0;  // the caller's (under busy_)
  std::mutex busy_;  // one caller at a time
  std::mutex mutex_;  // published_, started_
  std::condition_variable wake_;
  uint32_t published_ = 0;
  int started_ = 0;
};

}  // namespace lora_team
