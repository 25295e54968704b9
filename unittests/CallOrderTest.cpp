//===- CallOrderTest.cpp - stream ordering of a GPU package's calls -------===//
//
// The runtime's CallOrder (lib/Runtime/GpuModule.h) makes a call on another
// stream than the last call's wait for that call's end, so that two streams
// never share a package's state scratch or a ring's buffers. Its logic needs
// no GPU: these tests drive it with a driver whose entry points record what
// they are asked to do.
//
//===----------------------------------------------------------------------===//

#include "GpuModule.h"

#include "gtest/gtest.h"

#include <string>
#include <vector>

using namespace attn::runtime;

namespace {

/// What the stub driver was asked to do, in order.
std::vector<std::string> calls;
CUresult failCreate = CUDA_SUCCESS;

CUevent eventOf(int i) { return reinterpret_cast<CUevent>(uintptr_t(i)); }
CUstream streamOf(int i) { return reinterpret_cast<CUstream>(uintptr_t(i)); }

CUresult createEvent(CUevent *e, unsigned flags) {
  calls.push_back("create " + std::to_string(flags));
  if (failCreate != CUDA_SUCCESS)
    return failCreate;
  *e = eventOf(7);
  return CUDA_SUCCESS;
}
CUresult recordEvent(CUevent e, CUstream s) {
  calls.push_back("record " + std::to_string(uintptr_t(e)) + " on " +
                  std::to_string(uintptr_t(s)));
  return CUDA_SUCCESS;
}
CUresult waitEvent(CUstream s, CUevent e, unsigned) {
  calls.push_back("wait " + std::to_string(uintptr_t(s)) + " for " +
                  std::to_string(uintptr_t(e)));
  return CUDA_SUCCESS;
}
CUresult destroyEvent(CUevent e) {
  calls.push_back("destroy " + std::to_string(uintptr_t(e)));
  return CUDA_SUCCESS;
}

Driver stubDriver() {
  Driver d{};
  d.cuEventCreate = createEvent;
  d.cuEventRecord = recordEvent;
  d.cuStreamWaitEvent = waitEvent;
  d.cuEventDestroy = destroyEvent;
  return d;
}

/// A fresh CallOrder and stub driver, with the record of calls cleared.
class CallOrderTest : public ::testing::Test {
protected:
  void SetUp() override {
    calls.clear();
    failCreate = CUDA_SUCCESS;
  }
  void TearDown() override { failCreate = CUDA_SUCCESS; }
  Driver d = stubDriver();
  CallOrder order;
};

TEST_F(CallOrderTest, FirstCallWaitsForNothing) {
  EXPECT_EQ(order.waitIfOtherStream(d, streamOf(1)), CUDA_SUCCESS);
  EXPECT_TRUE(calls.empty());
}

TEST_F(CallOrderTest, OnlyAnotherStreamWaitsForTheLastCall) {
  ASSERT_EQ(order.record(d, streamOf(1)), CUDA_SUCCESS);
  // The event is made once, without timing, and recorded on the stream.
  EXPECT_EQ(calls, (std::vector<std::string>{
                       "create " + std::to_string(CU_EVENT_DISABLE_TIMING),
                       "record 7 on 1"}));
  calls.clear();
  EXPECT_EQ(order.waitIfOtherStream(d, streamOf(1)), CUDA_SUCCESS);
  EXPECT_TRUE(calls.empty()) << "a call on the same stream is ordered already";
  EXPECT_EQ(order.waitIfOtherStream(d, streamOf(2)), CUDA_SUCCESS);
  EXPECT_EQ(calls, (std::vector<std::string>{"wait 2 for 7"}));
  calls.clear();
  ASSERT_EQ(order.record(d, streamOf(2)), CUDA_SUCCESS);
  EXPECT_EQ(calls, (std::vector<std::string>{"record 7 on 2"}));
  calls.clear();
  EXPECT_EQ(order.waitIfOtherStream(d, streamOf(1)), CUDA_SUCCESS);
  EXPECT_EQ(calls, (std::vector<std::string>{"wait 1 for 7"}));
  calls.clear();
  order.destroy(d);
  EXPECT_EQ(calls, (std::vector<std::string>{"destroy 7"}));
  EXPECT_EQ(order.done, nullptr);
}

TEST_F(CallOrderTest, AFailedRecordIsReportedAndRemembersNoStream) {
  failCreate = 2; // CUDA_ERROR_OUT_OF_MEMORY
  EXPECT_EQ(order.record(d, streamOf(1)), 2);
  EXPECT_EQ(order.stream, nullptr);
  calls.clear();
  EXPECT_EQ(order.waitIfOtherStream(d, streamOf(2)), CUDA_SUCCESS);
  EXPECT_TRUE(calls.empty()) << "no event: nothing to wait for";
}

} // namespace
