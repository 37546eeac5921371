#include "tests/process_util.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"

namespace fm {

std::string BinDir() {
  if (const char* d = std::getenv("FM_BIN_DIR"); d && *d) return d;
  std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe").parent_path();
  if (std::filesystem::exists(exe.parent_path() / "bin"))
    return (exe.parent_path() / "bin").string();
  return exe.string();
}

std::string RandomBytes(size_t n, uint64_t seed) {
  std::string s(n, '\0');
  std::mt19937_64 rng(seed);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v = rng();
    std::memcpy(&s[i], &v, 8);
  }
  for (uint64_t v = rng(); i < n; ++i, v >>= 8) s[i] = static_cast<char>(v);
  return s;
}

std::string MakeTempDir(const std::string& prefix) {
  std::random_device rd;
  auto dir = std::filesystem::temp_directory_path() /
             absl::StrCat(prefix, "_", ::getpid(), "_", rd() % 1000000);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(const std::string& binary,
                                                                    std::vector<std::string> args,
                                                                    int timeout_ms,
                                                                    const std::string& log_file) {
  std::unique_ptr<ServerProcess> p(new ServerProcess());
  std::string path = binary.find('/') == std::string::npos ? BinDir() + "/" + binary : binary;
  p->ready_file_ = MakeTempDir("fm_ready") + "/ready";
  // --port 0 (the server picks) unless the caller names a port (a restart on the same one).
  const bool has_port = std::find(args.begin(), args.end(), "--port") != args.end();
  const bool has_host = std::find(args.begin(), args.end(), "--host") != args.end();
  args.insert(args.begin(), {path, "--ready_file", p->ready_file_});
  if (!has_host) args.insert(args.begin() + 1, {"--host", "127.0.0.1"});
  if (!has_port) args.insert(args.begin() + 1, {"--port", "0"});
  pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    // Unblock signals that a test runner may have blocked.
    sigset_t set;
    sigemptyset(&set);
    pthread_sigmask(SIG_SETMASK, &set, nullptr);
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test or benchmark
    if (!log_file.empty()) {
      const int fd = open(log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
      }
    }
    execv(path.c_str(), argv.data());
    _exit(127);
  }
  p->pid_ = pid;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream f(p->ready_file_);
    if (f && (f >> p->port_ >> p->metrics_port_) && p->port_ > 0) return p;
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      p->pid_ = -1;
      return absl::InternalError(
          absl::StrCat(path, " exited during start-up with status ", status));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError(
      absl::StrCat(path, " did not become ready in ", timeout_ms, " ms"));
}

bool ServerProcess::Alive() {
  if (pid_ < 0) return false;
  int status;
  if (waitpid(pid_, &status, WNOHANG) == pid_) {
    pid_ = -1;
    exit_status_ = status;
    return false;
  }
  return true;
}

int ServerProcess::Stop(int sig) {
  if (pid_ < 0) return -1;
  kill(pid_, sig);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  exit_status_ = status;
  return status;
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) Stop(SIGKILL);
  std::error_code ec;
  std::filesystem::remove_all(std::filesystem::path(ready_file_).parent_path(), ec);
}

}  // namespace fm
