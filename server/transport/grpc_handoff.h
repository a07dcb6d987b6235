// Tells ThreadSanitizer about the ordering gRPC guarantees between a
// reactor's operations and their callbacks: everything a thread did before
// StartRead/StartWrite/Finish happens before the reaction to it, on whatever
// gRPC thread runs that. gRPC's core is not built with TSan here, so TSan
// cannot see that edge on its own and would report the reactor's members
// as racing between the thread that started an operation and the one that
// reacts to it. Outside TSan builds these compile to nothing.
#ifndef BLOCKSEL_SERVER_TRANSPORT_GRPC_HANDOFF_H_
#define BLOCKSEL_SERVER_TRANSPORT_GRPC_HANDOFF_H_

#if defined(__SANITIZE_THREAD__)
#define BLOCKSEL_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define BLOCKSEL_TSAN 1
#endif
#endif

#ifdef BLOCKSEL_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace blocksel {

// Call right before handing reactor to gRPC (StartRead, StartWrite, Finish)
// from outside its callbacks.
inline void HandOffToGrpc([[maybe_unused]] const void* reactor) {
#ifdef BLOCKSEL_TSAN
  __tsan_release(const_cast<void*>(reactor));
#endif
}

// Call first thing in OnDone, which ends the reactor's life.
inline void TakeBackFromGrpc([[maybe_unused]] const void* reactor) {
#ifdef BLOCKSEL_TSAN
  __tsan_acquire(const_cast<void*>(reactor));
#endif
}

// Declare first thing in each other callback: it takes the reactor back on
// entry and hands it to gRPC again on return, since gRPC orders the
// reactions that follow (OnDone last) after this one.
class GrpcCallbackScope {
 public:
  explicit GrpcCallbackScope(const void* reactor) : reactor_(reactor) {
    TakeBackFromGrpc(reactor_);
  }
  ~GrpcCallbackScope() { HandOffToGrpc(reactor_); }
  GrpcCallbackScope(const GrpcCallbackScope&) = delete;
  GrpcCallbackScope& operator=(const GrpcCallbackScope&) = delete;

 private:
  const void* const reactor_;
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_TRANSPORT_GRPC_HANDOFF_H_
