// A decay schedule must be callable as double(std::int64_t step).
#include <polyak/core/ema_schedules.hpp>
int main() {
  auto wrong = [](const char*) { return 0.9; };
  polyak::ScheduledEMA<decltype(wrong)> ema(wrong);
}
