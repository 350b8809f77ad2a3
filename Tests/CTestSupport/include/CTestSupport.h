// The test machine's C side: what must happen before any test runs.
#pragma once
// Lock-order validation (LockOrder) on for every thread of the test process;
// run at load time, before the first test.
void svm_test_machine_start(void);
