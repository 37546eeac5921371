// fm-bench chaos: the cluster under the faults it sees every day. Starts two fm-kvstore,
// two fm-indexer and two fm-decode processes with mTLS (certificates from
// scripts/make_dev_certs.sh), runs every session once undisturbed (the reference), then
// runs `sessions` concurrent sparse sessions for `minutes` while a fault thread kills a
// random service every few seconds (SIGKILL or SIGTERM, half each) and starts it again on
// its port. A session whose worker died or lost it resumes on the other worker from its
// saved state; every output is compared with the reference, and every page a seal
// acknowledged is read back from the kvstores when its session completes. At the end, with
// every service up, the flood measurement runs against a worker. Prints and writes
// (--json) the figures the reliability issue names.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "services/decode/decode_client.h"
#include "services/kvstore/kv_client.h"
#include "tests/process_util.h"
#include "tools/fm_bench/bench.h"
#include "tools/replay/replay.h"

namespace fm::bench {
namespace v1 = flashmemory::v1;
namespace {

using Clock = std::chrono::steady_clock;

// A process's RSS drift is measured from this long after its start (its sessions, channels
// and buffers in place) to its end (a fault, or the end of the run). Each service reports
// the drift of its longest-lived process, and the window it was measured over.
constexpr double kRssWarmS = 30;

double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  close(fd);
  return port;
}

double RssMb(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

// One service of the cluster: how to start it, and the process while it runs.
struct Service {
  std::string name, binary, log;
  std::vector<std::string> args;  // --port included: a restart takes the same port
  int port = 0;
  std::mutex mu;
  std::unique_ptr<ServerProcess> proc;  // null while down
  Clock::time_point started;
  // This incarnation's RSS: the first sample once it has served kRssWarmS seconds, the last.
  double rss_first = -1, rss_last = 0;
  // The longest-lived incarnation's drift and its window (seconds), so far.
  double drift = 0, drift_window = -1;
  void EndIncarnation() {
    const double window = Since(started) - kRssWarmS;
    if (rss_first >= 0 && window > drift_window) {
      drift_window = window;
      drift = rss_last - rss_first;
    }
  }

  std::string target() const { return "127.0.0.1:" + std::to_string(port); }
  absl::Status StartLocked() {
    absl::Status last;
    for (int attempt = 0; attempt < 20; ++attempt) {
      auto p = ServerProcess::Start(binary, args, 30000, log);
      if (p.ok()) {
        proc = std::move(*p);
        started = Clock::now();
        rss_first = -1;
        return absl::OkStatus();
      }
      last = p.status();
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    return last;
  }
};

// What every session thread adds up.
struct Tally {
  std::mutex mu;
  std::map<std::string, uint64_t> errors;  // by status code name
  uint64_t steps = 0, steps_ok = 0, wrong = 0, degraded = 0, resumes = 0, sessions = 0,
           completed = 0, abandoned = 0, lost_sessions = 0, pages_checked = 0, pages_lost = 0;
  double max_wrong_diff = 0;
  void Error(absl::StatusCode code) {
    std::lock_guard<std::mutex> l(mu);
    ++errors[absl::StatusCodeToString(code)];
  }
};

struct Workload {
  std::unique_ptr<workload::Session> g;
  replay::PrefillData prefill;
  std::vector<float> out;                 // the reference: [step][layer][q_heads * head_dim]
  std::vector<std::string> pages;         // the reference's sealed page payloads
};

class Chaos {
 public:
  explicit Chaos(const ChaosBenchOptions& o) : o_(o), rng_(o.seed) {}
  int Run();

 private:
  absl::Status StartCluster();
  absl::Status Reference(uint32_t w);
  decode::SessionOptions SessionOpts(const Workload& w, bool resume) const;
  void SessionLoop(uint32_t thread);
  // Runs one session to its end (or the deadline); false when it had to be given up.
  void RunSession(uint32_t thread, uint64_t n);
  absl::Status CheckPages(const std::string& id, const Workload& w, uint64_t pages);
  void FaultLoop();
  void Watch();  // crashes (a service gone without the bench's signal) and RSS samples

  const ChaosBenchOptions& o_;
  std::string dir_;
  ClientSecurity client_sec_, service_sec_;
  std::vector<std::unique_ptr<Service>> svc_;  // kvstore-0/1, indexer-0/1, decode-0/1
  std::vector<std::unique_ptr<decode::DecodeClient>> dec_;  // one per worker
  std::unique_ptr<ShardedKvClient> kv_;                     // the page check's reader
  std::vector<Workload> work_;
  Tally tally_;
  std::mt19937_64 rng_;
  Clock::time_point end_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> faults_{0}, kills_{0}, terms_{0}, crashes_{0};
  std::vector<std::string> crash_notes_;
};

absl::Status Chaos::StartCluster() {
  dir_ = MakeTempDir("fm_chaos");
  const std::string certs = o_.certs.empty() ? dir_ + "/certs" : o_.certs;
  if (o_.certs.empty()) {
    const std::string cmd = std::string("bash ") + FM_SOURCE_DIR + "/scripts/make_dev_certs.sh " +
                            certs + " > /dev/null";
    if (std::system(cmd.c_str()) != 0)
      return absl::InternalError("scripts/make_dev_certs.sh failed (is openssl installed?)");
  }
  const std::vector<std::string> tls = {"--tls_cert", certs + "/service.pem", "--tls_key",
                                        certs + "/service.key", "--tls_ca", certs + "/ca.pem",
                                        "--shutdown_grace_ms", "3000"};
  client_sec_.tls.ca = service_sec_.tls.ca = certs + "/ca.pem";
  client_sec_.tls.cert = certs + "/client.pem";
  client_sec_.tls.key = certs + "/client.key";
  service_sec_.tls.cert = certs + "/service.pem";
  service_sec_.tls.key = certs + "/service.key";
  auto add = [&](const std::string& name, const std::string& bin, std::vector<std::string> args) {
    auto s = std::make_unique<Service>();
    s->name = name;
    s->binary = bin;
    s->port = FreePort();
    s->log = dir_ + "/" + name + ".log";
    args.insert(args.end(), {"--port", std::to_string(s->port)});
    args.insert(args.end(), tls.begin(), tls.end());
    s->args = std::move(args);
    svc_.push_back(std::move(s));
  };
  for (int i = 0; i < 2; ++i)
    add("kvstore-" + std::to_string(i), "fm-kvstore",
        {"--db", dir_ + "/kv" + std::to_string(i), "--ram_bytes", "64MiB", "--slab_bytes",
         "4MiB"});
  for (int i = 0; i < 2; ++i) add("indexer-" + std::to_string(i), "fm-indexer", {});
  const std::string kvs = svc_[0]->target() + "," + svc_[1]->target();
  const std::string ixs = svc_[2]->target() + "," + svc_[3]->target();
  for (int i = 0; i < 2; ++i)
    add("decode-" + std::to_string(i), "fm-decode",
        {"--kvstore", kvs, "--indexer", ixs, "--reserve_bytes", "96MiB"});
  for (auto& s : svc_) {
    std::lock_guard<std::mutex> l(s->mu);
    if (absl::Status st = s->StartLocked(); !st.ok())
      return absl::Status(st.code(), absl::StrCat(s->name, ": ", st.message()));
  }
  for (int i = 0; i < 2; ++i) {
    auto c = decode::DecodeClient::Connect(svc_[4 + i]->target(), 30000, client_sec_);
    if (!c.ok()) return c.status();
    dec_.push_back(std::move(*c));
  }
  KvClientOptions ko;
  ko.security = service_sec_;
  ko.deadline_ms = 5000;
  auto kv = ShardedKvClient::Connect({svc_[0]->target(), svc_[1]->target()}, ko);
  if (!kv.ok()) return kv.status();
  kv_ = std::move(*kv);
  return absl::OkStatus();
}

decode::SessionOptions Chaos::SessionOpts(const Workload& w, bool resume) const {
  decode::SessionOptions so;
  so.spec = w.g->spec();
  so.mode = decode::Mode::kSparse;
  so.policy = indexer::Policy::kQuest;
  so.budget = 0.25f;
  so.tau = 16;
  so.max_tokens = w.g->position(o_.steps);
  so.resume = resume;
  return so;
}

absl::Status Chaos::CheckPages(const std::string& id, const Workload& w, uint64_t pages) {
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (true) {
    std::vector<PageRef> keys;
    for (uint64_t p = 0; p < pages; ++p) keys.push_back({id, p});
    auto r = kv_->Read(keys);
    if (r.ok()) {
      std::lock_guard<std::mutex> l(tally_.mu);
      tally_.pages_checked += pages;
      for (uint64_t p = 0; p < pages; ++p) tally_.pages_lost += (*r)[p].payload != w.pages[p];
      return absl::OkStatus();
    }
    if (!absl::IsUnavailable(r.status()) && !absl::IsDeadlineExceeded(r.status())) {
      // NOT_FOUND or DATA_LOSS: read page by page to count what is gone.
      uint64_t lost = 0;
      for (uint64_t p = 0; p < pages; ++p) {
        auto one = kv_->Read({{id, p}});
        lost += !one.ok() || (*one)[0].payload != w.pages[p];
      }
      std::lock_guard<std::mutex> l(tally_.mu);
      tally_.pages_checked += pages;
      tally_.pages_lost += lost;
      return r.status();
    }
    if (Clock::now() > deadline) return r.status();  // a kvstore stayed down: not counted
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

absl::Status Chaos::Reference(uint32_t i) {
  workload::SessionConfig c;
  c.spec = *PresetSpec("tiny");
  c.knobs.tau = 16;
  c.seed = o_.seed + i;
  c.prefill_tokens = o_.prefill_tokens;
  c.steps = o_.steps;
  auto g = workload::Session::Generate(c);
  if (!g.ok()) return g.status();
  Workload& w = work_[i];
  w.g = std::move(*g);
  w.prefill = replay::MakePrefill(*w.g);
  const std::string id = "ref-" + std::to_string(i);
  decode::DecodeClient& client = *dec_[i % 2];
  replay::ReplayOptions ro;
  ro.session_id = id;
  ro.budget = 0.25f;
  ro.policy = indexer::Policy::kQuest;
  replay::ReplayResult unused;
  if (absl::Status st = replay::OpenAndPrefill(client, *w.g, w.prefill, ro, &unused); !st.ok())
    return st;
  const ModelSpec& sp = w.g->spec();
  const size_t row = size_t{sp.layers} * sp.q_heads * sp.head_dim;
  w.out.assign(size_t{o_.steps} * row, 0.0f);
  replay::StepSource src(*w.g, id, 16);
  auto stream = client.OpenStream();
  for (uint32_t st = 0; st < o_.steps; ++st) {
    v1::DecodeBatch b;
    *b.add_requests() = src.Request(st, 0, sp.layers);
    auto r = stream->Run(b);
    if (!r.ok()) return r.status();
    if (r->results(0).code() != 0)
      return absl::InternalError(absl::StrCat("reference step ", st, ": ", r->results(0).message()));
    std::memcpy(w.out.data() + st * row, r->results(0).out().data(), row * 4);
  }
  (void)stream->Finish();
  auto stats = client.Stats(id);
  if (!stats.ok()) return stats.status();
  if (stats->prediction_failures() != 0)
    return absl::InternalError("the undisturbed reference lost a prediction");
  const uint64_t pages = w.g->position(o_.steps) / sp.page_tokens;
  std::vector<PageRef> keys;
  for (uint64_t p = 0; p < pages; ++p) keys.push_back({id, p});
  auto rec = kv_->Read(keys);
  if (!rec.ok()) return rec.status();
  for (auto& r : *rec) w.pages.push_back(std::move(r.payload));
  return client.Close(id, true);
}

void Chaos::RunSession(uint32_t thread, uint64_t n) {
  const uint32_t wi = thread % work_.size();
  const Workload& w = work_[wi];
  const ModelSpec& sp = w.g->spec();
  const size_t row = size_t{sp.layers} * sp.q_heads * sp.head_dim;
  const std::string id = absl::StrCat("chaos-", thread, "-", n);
  {
    std::lock_guard<std::mutex> l(tally_.mu);
    ++tally_.sessions;
  }
  // Each worker starts half the threads' sessions, so that a worker killed always holds
  // sessions (a session that resumed elsewhere ends there; the thread's next starts here).
  size_t worker = thread % 2;
  // Open and prefill; a fault here gives the session up (its prefill never completed, so
  // there is nothing to resume) and the thread starts another.
  replay::ReplayOptions ro;
  ro.session_id = id;
  ro.budget = 0.25f;
  ro.policy = indexer::Policy::kQuest;
  replay::ReplayResult unused;
  if (absl::Status st = replay::OpenAndPrefill(*dec_[worker], *w.g, w.prefill, ro, &unused);
      !st.ok()) {
    tally_.Error(st.code());
    for (auto& d : dec_) (void)d->Close(id, true);
    {
      std::lock_guard<std::mutex> l(tally_.mu);
      ++tally_.abandoned;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(250));  // a service restarting
    return;
  }
  replay::StepSource src(*w.g, id, 16);
  auto stream = dec_[worker]->OpenStream();
  bool degraded = false;
  uint32_t step = 0;
  // Moves the session to a worker that holds it or resumes it; false: given up.
  auto resume = [&]() -> bool {
    (void)stream->Finish();
    for (int attempt = 0; attempt < 80 && !stop_; ++attempt) {
      const size_t to = (worker + 1 + attempt) % 2;
      absl::Status st = dec_[to]->Open(id, SessionOpts(w, true)).status();
      if (st.ok()) {
        std::lock_guard<std::mutex> l(tally_.mu);
        ++tally_.resumes;
      }
      if (st.ok() || absl::IsAlreadyExists(st)) {  // resumed, or that worker holds it
        auto stats = dec_[to]->Stats(id);
        if (stats.ok()) {
          worker = to;
          step = static_cast<uint32_t>(stats->steps());
          stream = dec_[worker]->OpenStream();
          return true;
        }
        st = stats.status();
      }
      tally_.Error(st.code());
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    return false;
  };
  const auto paced = Clock::now();
  uint64_t sent = 0;
  while (step < o_.steps && !stop_) {
    std::this_thread::sleep_until(paced + std::chrono::microseconds(static_cast<int64_t>(
                                              sent++ * o_.step_interval_ms * 1e3)));
    v1::DecodeBatch b;
    *b.add_requests() = src.Request(step, 0, sp.layers);
    auto r = stream->Run(b);
    {
      std::lock_guard<std::mutex> l(tally_.mu);
      ++tally_.steps;
    }
    const absl::StatusCode code =
        !r.ok() ? r.status().code() : static_cast<absl::StatusCode>(r->results(0).code());
    if (code == absl::StatusCode::kOk) {
      double diff = 0;
      const float* got = reinterpret_cast<const float*>(r->results(0).out().data());
      const float* want = w.out.data() + size_t{step} * row;
      for (size_t k = 0; k < row; ++k) diff = std::max(diff, double(std::fabs(got[k] - want[k])));
      if (diff > 1e-4 && !degraded) {
        // A cycle that lost its prediction serves the set before it: a valid sparse output,
        // not the reference's. The worker's stats say whether that happened.
        auto stats = dec_[worker]->Stats(id);
        degraded = stats.ok() && stats->prediction_failures() > 0;
      }
      std::lock_guard<std::mutex> l(tally_.mu);
      ++tally_.steps_ok;
      if (diff > 1e-4) {
        if (degraded) {
          ++tally_.degraded;
        } else {
          ++tally_.wrong;
          tally_.max_wrong_diff = std::max(tally_.max_wrong_diff, diff);
        }
      }
      ++step;
      continue;
    }
    tally_.Error(code);
    if (r.ok() && (code == absl::StatusCode::kUnavailable ||
                   code == absl::StatusCode::kResourceExhausted ||
                   code == absl::StatusCode::kDeadlineExceeded)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));  // a store restarting
      continue;
    }
    // The stream broke (the worker died or drains), or the worker lost or gave up the
    // session (NOT_FOUND after a restart, ABORTED once it moved): resume it.
    if (!resume()) {
      std::lock_guard<std::mutex> l(tally_.mu);
      ++tally_.lost_sessions;
      return;
    }
  }
  (void)stream->Finish();
  if (step < o_.steps) {  // the run ended first
    (void)dec_[worker]->Close(id, true);
    return;
  }
  {
    std::lock_guard<std::mutex> l(tally_.mu);
    ++tally_.completed;
  }
  // Every page a seal acknowledged is in the kvstores, as the reference wrote it.
  if (absl::Status st = CheckPages(id, w, w.g->position(o_.steps) / sp.page_tokens); !st.ok())
    tally_.Error(st.code());
  for (int attempt = 0; attempt < 20; ++attempt) {
    absl::Status st = dec_[worker]->Close(id, true);
    if (st.ok() || absl::IsNotFound(st)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
}

void Chaos::SessionLoop(uint32_t thread) {
  for (uint64_t n = 0; !stop_ && Clock::now() < end_; ++n) RunSession(thread, n);
}

void Chaos::Watch() {
  for (auto& s : svc_) {
    std::lock_guard<std::mutex> l(s->mu);
    if (!s->proc) continue;
    if (!s->proc->Alive()) {  // gone without the bench's signal: a crash
      const int st = s->proc->exit_status();
      ++crashes_;
      crash_notes_.push_back(absl::StrCat(
          s->name, WIFSIGNALED(st) ? " killed by signal " : " exited with ",
          WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st), " (log ", s->log, ")"));
      s->EndIncarnation();
      s->proc.reset();
      (void)s->StartLocked();
      continue;
    }
    const double rss = RssMb(s->proc->pid());
    if (Since(s->started) >= kRssWarmS && s->rss_first < 0) s->rss_first = rss;
    s->rss_last = rss;
  }
}

void Chaos::FaultLoop() {
  std::uniform_real_distribution<double> gap(0.5 * o_.fault_every_s, 1.5 * o_.fault_every_s);
  std::uniform_int_distribution<int> down_ms(200, 1500);
  while (Clock::now() < end_) {
    const auto next = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                         std::chrono::duration<double>(gap(rng_)));
    while (Clock::now() < next && Clock::now() < end_) {
      Watch();
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (Clock::now() >= end_) break;
    Service& s = *svc_[rng_() % svc_.size()];
    const bool kill9 = rng_() % 2 == 0;
    {
      std::lock_guard<std::mutex> l(s.mu);
      if (!s.proc) continue;
      s.EndIncarnation();
      const int st = s.proc->Stop(kill9 ? SIGKILL : SIGTERM);
      s.proc.reset();
      const bool expected = kill9 ? (WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL)
                                  : (WIFEXITED(st) && WEXITSTATUS(st) == 0);
      if (!expected) {
        ++crashes_;
        crash_notes_.push_back(absl::StrCat(s.name, kill9 ? " (SIGKILL)" : " (SIGTERM)",
                                            " ended with status ", st, " (log ", s.log, ")"));
      }
    }
    ++faults_;
    ++(kill9 ? kills_ : terms_);
    std::printf("  %6.1f s  %-10s %s\n", o_.minutes * 60 - std::chrono::duration<double>(
                                                               end_ - Clock::now()).count(),
                s.name.c_str(), kill9 ? "SIGKILL" : "SIGTERM");
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::milliseconds(down_ms(rng_)));
    std::lock_guard<std::mutex> l(s.mu);
    if (absl::Status st = s.StartLocked(); !st.ok())
      std::fprintf(stderr, "chaos: cannot restart %s: %s\n", s.name.c_str(),
                   st.ToString().c_str());
  }
}

int Chaos::Run() {
  if (absl::Status st = StartCluster(); !st.ok())
    return std::fprintf(stderr, "chaos: %s\n", st.ToString().c_str()), 1;
  std::printf("chaos: 2 kvstores, 2 indexers, 2 decode workers, mTLS; logs in %s\n", dir_.c_str());
  work_.resize(std::min<uint32_t>(o_.sessions, 4));
  for (uint32_t i = 0; i < work_.size(); ++i)
    if (absl::Status st = Reference(i); !st.ok())
      return std::fprintf(stderr, "chaos: reference %u: %s\n", i, st.ToString().c_str()), 1;
  std::printf("reference: %zu sessions of %u steps (tiny spec, %llu-token prefill, quest at "
              "25 %%), undisturbed\n",
              work_.size(), o_.steps, static_cast<unsigned long long>(o_.prefill_tokens));
  Watch();
  std::printf("faults for %.1f min, one every ~%.1f s:\n", o_.minutes, o_.fault_every_s);
  const auto begin = Clock::now();
  end_ = begin + std::chrono::duration_cast<Clock::duration>(
                     std::chrono::duration<double>(o_.minutes * 60));
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < o_.sessions; ++t) threads.emplace_back([this, t] { SessionLoop(t); });
  FaultLoop();
  for (auto& t : threads) t.join();
  const double chaos_s = Since(begin);
  // Settle: every service up, then the last RSS samples and the flood figure.
  std::this_thread::sleep_for(std::chrono::seconds(2));
  Watch();
  FloodBenchOptions fo;
  fo.seconds = o_.flood_seconds;
  auto flood = MeasureFlood(svc_[4]->target(), client_sec_, fo, "flood-victim");
  Watch();

  nlohmann::json j;
  j["minutes"] = chaos_s / 60;
  j["faults_injected"] = faults_.load();
  j["faults_sigkill"] = kills_.load();
  j["faults_sigterm"] = terms_.load();
  j["sessions"] = tally_.sessions;
  j["sessions_completed"] = tally_.completed;
  j["sessions_abandoned_in_prefill"] = tally_.abandoned;
  j["sessions_lost"] = tally_.lost_sessions;
  j["steps"] = tally_.steps;
  j["steps_ok"] = tally_.steps_ok;
  j["wrong_outputs"] = tally_.wrong;
  j["degraded_outputs"] = tally_.degraded;
  j["acked_pages_checked"] = tally_.pages_checked;
  j["acked_pages_lost"] = tally_.pages_lost;
  j["crashes"] = crashes_.load();
  j["errors_by_code"] = tally_.errors;
  j["resumes"] = tally_.resumes;
  for (auto& s : svc_) {
    s->EndIncarnation();
    j["rss_drift_mb"][s->name] =
        s->drift_window < 0 ? nlohmann::json() : nlohmann::json(s->drift);
    j["rss_drift_window_s"][s->name] = std::max(0.0, s->drift_window);
    j["rss_mb"][s->name] = s->rss_last;
  }
  if (flood.ok()) {
    j["flood_p99_ratio"] = flood->ratio;
    j["flood_p99_alone_ms"] = flood->p99_alone;
    j["flood_p99_flooded_ms"] = flood->p99_flood;
  } else {
    j["flood_error"] = flood.status().ToString();
  }
  std::printf("\n%s\n", j.dump(2).c_str());
  for (const auto& n : crash_notes_) std::printf("crash: %s\n", n.c_str());
  if (!o_.json.empty()) std::ofstream(o_.json) << j.dump(2) << "\n";
  for (auto& s : svc_) {
    std::lock_guard<std::mutex> l(s->mu);
    if (s->proc) s->proc->Stop(SIGTERM);
  }
  if (crashes_ == 0 && !o_.keep) std::filesystem::remove_all(dir_);
  return tally_.wrong == 0 && tally_.pages_lost == 0 && crashes_ == 0 ? 0 : 3;
}

}  // namespace

int RunChaosBench(const ChaosBenchOptions& o) { return Chaos(o).Run(); }

}  // namespace fm::bench
