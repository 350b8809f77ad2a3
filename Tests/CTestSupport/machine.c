// The test machine: lock-order validation (lockdep) on for every test, real
// threads and emulated alike, from the moment the test process loads.
#include "CTestSupport.h"
#include "svm_support.h"

__attribute__((constructor)) void svm_test_machine_start(void) {
    svm_lockdep_enable_everywhere();
}
