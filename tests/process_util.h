// Starts real FlashMemory binaries as child processes for integration tests and benchmarks:
// loopback port chosen by the server (--port 0), learned from its --ready_file.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fm {

// Directory of the built binaries: $FM_BIN_DIR, else the directory of /proc/self/exe's
// sibling "bin" (build/tests -> build/bin), else the executable's own directory.
std::string BinDir();

// n deterministic pseudo-random bytes (a page payload for tests and benchmarks).
std::string RandomBytes(size_t n, uint64_t seed);

// A fresh temporary directory (removed by the caller).
std::string MakeTempDir(const std::string& prefix);

class ServerProcess {
 public:
  // Runs `binary` (a name in BinDir() or a path) with args plus --host 127.0.0.1 and
  // --port 0 (unless args name them) and --ready_file; waits until it is serving or timeout_ms passes.
  // log_file: where its stdout and stderr go (appended); empty = this process's.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(const std::string& binary,
                                                              std::vector<std::string> args,
                                                              int timeout_ms = 30000,
                                                              const std::string& log_file = "");
  ~ServerProcess();  // SIGKILL if still running

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  std::string target() const { return "127.0.0.1:" + std::to_string(port_); }
  pid_t pid() const { return pid_; }
  // False once it has exited (reaped: exit_status() says how).
  bool Alive();
  int exit_status() const { return exit_status_; }  // as from waitpid; -1 while running
  // Sends `sig` and waits for exit; returns the exit status as from waitpid.
  int Stop(int sig);

 private:
  ServerProcess() = default;
  pid_t pid_ = -1;
  int exit_status_ = -1;
  int port_ = 0;
  int metrics_port_ = -1;
  std::string ready_file_;
};

}  // namespace fm
