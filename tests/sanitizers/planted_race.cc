// A data race on purpose, built only in the tsan preset: the suite's first
// check that ThreadSanitizer reports races and symbolizes its reports
// (tsan_setup_test.sh). Suppressions match function names, so with an
// unsymbolized report they silently match nothing.
#include <thread>

namespace {

int shared_counter = 0;  // written by two threads with nothing ordering them

__attribute__((noinline)) void PlantedRaceWriterOne() { shared_counter = 1; }
__attribute__((noinline)) void PlantedRaceWriterTwo() { shared_counter = 2; }

}  // namespace

int main() {
  std::thread first(PlantedRaceWriterOne);
  std::thread second(PlantedRaceWriterTwo);
  first.join();
  second.join();
  return shared_counter == 0 ? 1 : 0;
}
