// Minimal leveled logging to stderr: FM_LOG(INFO) << "..." style is avoided in favour of
// printf-style calls so that this header stays light.
#pragma once

#include <cstdarg>

namespace fm {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Thread-safe. Messages below the level set by SetLogLevel are dropped.
void SetLogLevel(LogLevel level);
void Log(LogLevel level, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

}  // namespace fm

#define FM_LOG_INFO(...) ::fm::Log(::fm::LogLevel::kInfo, __VA_ARGS__)
#define FM_LOG_WARN(...) ::fm::Log(::fm::LogLevel::kWarning, __VA_ARGS__)
#define FM_LOG_ERROR(...) ::fm::Log(::fm::LogLevel::kError, __VA_ARGS__)
#define FM_LOG_DEBUG(...) ::fm::Log(::fm::LogLevel::kDebug, __VA_ARGS__)
