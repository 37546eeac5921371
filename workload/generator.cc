#include "workload/generator.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/codecs.h"

namespace fm::workload {
namespace {

// Latent dims: [sink, bias, topic dims ..., needle dims (the last kNeedleDims)].
constexpr uint32_t kSinkDim = 0, kBiasDim = 1, kFirstTopicDim = 2, kNeedleDims = 8;
constexpr uint32_t kNone = ~0u;
constexpr double kBias = 0.5;     // the constant component of every chunk latent
constexpr uint32_t kClasses = 4;  // {sharp, diffuse} x {plain, needle}
constexpr uint32_t kNoiseBank = 256;
constexpr uint32_t kHiddenSlots = 3;  // focus, announced next focus, needles  // distinct per-token
                                      // K variations per (layer, kv head)

using Rng = std::mt19937_64;

uint64_t Mix(uint64_t x) {  // splitmix64 finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// rows x cols with orthonormal columns (Gram-Schmidt of a Gaussian matrix), row-major.
std::vector<float> Orthonormal(uint32_t rows, uint32_t cols, Rng& rng) {
  std::normal_distribution<double> nd;
  std::vector<double> m(size_t{rows} * cols);
  for (double& x : m) x = nd(rng);
  for (uint32_t c = 0; c < cols; ++c) {
    for (uint32_t p = 0; p < c; ++p) {
      double dot = 0;
      for (uint32_t r = 0; r < rows; ++r) dot += m[size_t{r} * cols + c] * m[size_t{r} * cols + p];
      for (uint32_t r = 0; r < rows; ++r) m[size_t{r} * cols + c] -= dot * m[size_t{r} * cols + p];
    }
    double n = 0;
    for (uint32_t r = 0; r < rows; ++r) n += m[size_t{r} * cols + c] * m[size_t{r} * cols + c];
    n = 1 / std::sqrt(n);
    for (uint32_t r = 0; r < rows; ++r) m[size_t{r} * cols + c] *= n;
  }
  return std::vector<float>(m.begin(), m.end());
}

// A unit vector in dims [lo, hi) of R^r.
std::vector<double> UnitIn(uint32_t r, uint32_t lo, uint32_t hi, Rng& rng) {
  std::normal_distribution<double> nd;
  std::vector<double> v(r, 0.0);
  double n = 0;
  for (uint32_t i = lo; i < hi; ++i) n += (v[i] = nd(rng)) * v[i];
  for (double& x : v) x /= std::sqrt(n);
  return v;
}
// Topics span the topic dims; needles the needle dims, so a needle is distinct from every
// topic (as a passkey is from the text around it) and its retrieval has no distractors.
std::vector<double> TopicVector(uint32_t r, Rng& rng) {
  return UnitIn(r, kFirstTopicDim, r - kNeedleDims, rng);
}
std::vector<double> NeedleVector(uint32_t r, Rng& rng) {
  return UnitIn(r, r - kNeedleDims, r, rng);
}

void Normalize(std::vector<double>& v) {
  double n = 0;
  for (double x : v) n += x * x;
  if (n > 0)
    for (double& x : v) x /= std::sqrt(n);
}

// The world: what every session of one world_seed shares (the "model").
struct World {
  std::vector<std::vector<double>> topic, drift;  // [vocab][r] unit topic-dim vectors
  std::vector<std::vector<float>> a;              // [layer * kv_heads]: d x r
  std::vector<std::vector<float>> key_noise;      // [layer * kv_heads]: kNoiseBank x d
  std::vector<std::vector<float>> b;              // [index layer]: (di - rope) x r
  std::vector<float> wh;                          // hidden x (r + 1)
  std::vector<uint8_t> diffuse;                   // [layer][q head]
  std::vector<uint8_t> retrieval;                 // [layer]
};

World MakeWorld(const ModelSpec& s, const Knobs& k, uint32_t r, const kernels::IndexerShape& is) {
  World w;
  Rng rng(Mix(k.world_seed * 0x2545f4914f6cdd1dull + 17));
  for (uint32_t m = 0; m < k.vocab_topics; ++m) {
    w.topic.push_back(TopicVector(r, rng));
    w.drift.push_back(TopicVector(r, rng));
  }
  for (uint32_t i = 0; i < s.layers * s.kv_heads; ++i)
    w.a.push_back(Orthonormal(s.head_dim, r, rng));
  // Token-level variation of K orthogonal to span(A): no query sees it, but it widens
  // per-page min/max bounds as real keys' per-token variation does.
  {
    Rng nrng(Mix(k.world_seed * 0x2545f4914f6cdd1dull + 29));  // its own stream
    std::normal_distribution<double> g;
    for (const auto& a : w.a) {
      std::vector<float> bank(size_t{kNoiseBank} * s.head_dim);
      std::vector<double> v(s.head_dim);
      for (uint32_t b = 0; b < kNoiseBank; ++b) {
        for (double& x : v) x = g(nrng);
        for (uint32_t j = 0; j < r; ++j) {
          double dot = 0;
          for (uint32_t i = 0; i < s.head_dim; ++i) dot += a[size_t{i} * r + j] * v[i];
          for (uint32_t i = 0; i < s.head_dim; ++i) v[i] -= dot * a[size_t{i} * r + j];
        }
        Normalize(v);
        for (uint32_t i = 0; i < s.head_dim; ++i)
          bank[size_t{b} * s.head_dim + i] = static_cast<float>(v[i] * k.key_noise);
      }
      w.key_noise.push_back(std::move(bank));
    }
  }
  std::normal_distribution<double> nd;
  for (uint32_t l = 0; l < s.index_layers; ++l) {
    w.b.push_back(Orthonormal(s.index_dim - is.rope_dims, r, rng));
  }
  {
    Rng hrng(Mix(k.world_seed * 0x2545f4914f6cdd1dull + 41));  // its own stream
    w.wh = Orthonormal(s.hidden_dim, kHiddenSlots * r + 1, hrng);
  }
  std::uniform_real_distribution<double> ud;
  for (uint32_t i = 0; i < s.layers * s.q_heads; ++i)
    w.diffuse.push_back(ud(rng) < k.diffuse_heads);
  for (uint32_t l = 0; l < s.layers; ++l) w.retrieval.push_back(l >= s.layers / 2);
  return w;
}

double Dot(const float* a, const std::vector<double>& b, uint32_t r) {
  double s = 0;
  for (uint32_t i = 0; i < r; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

kernels::IndexerShape IndexerShapeFor(const ModelSpec& spec, uint32_t rank) {
  kernels::IndexerShape s;
  s.layers = spec.index_layers;
  s.heads = spec.index_heads;
  s.dim = spec.index_dim;
  s.hidden = spec.hidden_dim;
  s.rank = rank;
  s.rope_dims = std::min(64u, spec.index_dim / 2);
  return s;
}

uint64_t Session::total_pages() const {
  return spec().PagesForTokens(config_.prefill_tokens + config_.steps);
}
uint64_t Session::indexed_chunks(uint32_t step) const {
  return tokens_at(step) / spec().page_tokens * spec().ChunksPerPage();
}
uint64_t Session::pages_at(uint32_t step) const { return spec().PagesForTokens(tokens_at(step)); }

absl::StatusOr<std::unique_ptr<Session>> Session::Generate(const SessionConfig& config) {
  const ModelSpec& s = config.spec;
  if (absl::Status st = s.Validate(); !st.ok()) return st;
  if (s.index_layers == 0 || s.hidden_dim == 0)
    return absl::InvalidArgumentError(
        "the workload needs a spec with index layers and a hidden_dim");
  if (config.prefill_tokens < s.page_tokens)
    return absl::InvalidArgumentError(
        absl::StrCat("prefill_tokens must be at least one page (", s.page_tokens, ")"));
  if (config.knobs.tau == 0 || config.steps == 0 || config.steps % config.knobs.tau != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("steps must be a positive multiple of tau (", config.knobs.tau, ")"));
  if (config.knobs.session_topics < 2 || config.knobs.session_topics > config.knobs.vocab_topics)
    return absl::InvalidArgumentError("session_topics must be in [2, vocab_topics]");
  if (config.knobs.top_p <= 0 || config.knobs.top_p > 1 || config.knobs.label_layers == 0 ||
      config.knobs.label_layers > s.layers)
    return absl::InvalidArgumentError("top_p must be in (0, 1] and label_layers in [1, layers]");
  std::unique_ptr<Session> out(new Session(config));
  if (absl::Status st = out->Build(); !st.ok()) return st;
  return out;
}

absl::Status Session::Build() {
  const ModelSpec& s = config_.spec;
  const Knobs& k = config_.knobs;
  const kernels::IndexerShape is = IndexerShapeFor(s, 1);
  r_ = std::min(k.latent_dim, is.dim - is.rope_dims);
  r_ = std::min(r_, s.head_dim);
  if (r_ < kFirstTopicDim + kNeedleDims + 8)
    return absl::InvalidArgumentError("latent_dim too small");
  hd_ = s.hidden_dim;
  if (hd_ < kHiddenSlots * r_ + 1)
    return absl::InvalidArgumentError(absl::StrCat("hidden_dim ", hd_, " is below the ",
                                                   kHiddenSlots * r_ + 1,
                                                   " directions the hidden state carries"));
  const uint32_t c = s.chunk_tokens, r = r_;
  const World w = MakeWorld(s, k, r, is);
  Rng rng(Mix(config_.seed ^ Mix(k.world_seed)));
  std::uniform_real_distribution<double> ud;
  std::normal_distribution<double> nd;
  auto geometric = [&](double mean) {  // >= 1
    return 1 + static_cast<uint64_t>(-std::log(1 - ud(rng)) * std::max(0.0, mean - 1));
  };

  // History: the sink chunk, then episodes of session topics; needles over the older 90 %.
  const uint64_t total_tokens = config_.prefill_tokens + config_.steps;
  const uint64_t chunks = (total_tokens + c - 1) / c;
  const uint64_t prefill_chunks = (config_.prefill_tokens + c - 1) / c;
  std::vector<uint32_t> topics(k.vocab_topics);
  std::iota(topics.begin(), topics.end(), 0);
  std::shuffle(topics.begin(), topics.end(), rng);
  topics.resize(k.session_topics);
  z_.assign(chunks * r, 0.0f);
  topic_of_.assign(chunks, kNone);
  auto drifted = [&](uint32_t m, double x) {  // topic m at history fraction x in [0, 1]
    std::vector<double> v = w.topic[m];
    for (uint32_t i = 0; i < r; ++i) v[i] += k.drift * (2 * x - 1) * w.drift[m][i];
    Normalize(v);
    return v;
  };
  auto set_chunk = [&](uint64_t j, const std::vector<double>& dir, double noise) {
    std::vector<double> v = dir;
    const double sd = noise / std::sqrt(double(r - kNeedleDims - kFirstTopicDim));
    for (uint32_t i = kFirstTopicDim; i < r - kNeedleDims; ++i) v[i] += sd * nd(rng);
    Normalize(v);
    float* zj = z_.data() + j * r;
    for (uint32_t i = 0; i < r; ++i) zj[i] = static_cast<float>(v[i]);
    zj[kBiasDim] = static_cast<float>(kBias);
  };
  z_[kSinkDim] = 1.0f;
  z_[kBiasDim] = static_cast<float>(kBias);
  uint32_t last_topic = kNone;
  for (uint64_t j = 1; j < prefill_chunks;) {
    uint32_t m;
    do m = topics[static_cast<size_t>(ud(rng) * topics.size())];
    while (m == last_topic);
    const uint64_t len = geometric(k.episode_tokens / c);
    for (uint64_t e = 0; e < len && j < prefill_chunks; ++e, ++j) {
      topic_of_[j] = m;
      set_chunk(j, drifted(m, double(j) / chunks), k.chunk_noise);
    }
    last_topic = m;
  }
  // Focus segments over the decode steps.
  focus_.resize(config_.steps);
  auto pick_focus = [&](uint32_t prev) {
    uint32_t m;
    if (ud(rng) < k.recent_focus && last_topic != prev) return last_topic;
    do m = topics[static_cast<size_t>(ud(rng) * topics.size())];
    while (m == prev);
    return m;
  };
  for (uint32_t st = 0, cur = kNone; st < config_.steps;) {
    cur = pick_focus(cur);
    const uint64_t len = geometric(k.focus_steps);
    for (uint64_t e = 0; e < len && st < config_.steps; ++e) focus_[st++] = cur;
  }
  // Decoded chunks belong to the focus of the step that starts them.
  for (uint64_t j = prefill_chunks; j < chunks; ++j) {
    const uint32_t st = static_cast<uint32_t>(
        std::min<uint64_t>(j * c - config_.prefill_tokens, config_.steps - 1));
    topic_of_[j] = focus_[st];
    set_chunk(j, drifted(focus_[st], 1.0), k.decoded_noise);
  }
  // Needles: fresh directions in old history chunks, each retrieved by one decode step.
  std::vector<std::vector<double>> needle_dir;
  const uint64_t old_end = std::max<uint64_t>(2, prefill_chunks * 9 / 10);
  std::vector<uint32_t> steps_used;
  for (uint32_t n = 0; n < k.needles && old_end > 2; ++n) {
    const uint64_t j = 1 + static_cast<uint64_t>(ud(rng) * (old_end - 1));
    uint32_t st = static_cast<uint32_t>(ud(rng) * config_.steps);
    if (std::count(steps_used.begin(), steps_used.end(), st) ||
        std::any_of(needles_.begin(), needles_.end(),
                    [&](const Needle& x) { return x.chunk == j; }))
      continue;
    steps_used.push_back(st);
    needle_dir.push_back(NeedleVector(r, rng));
    topic_of_[j] = kNone;
    set_chunk(j, needle_dir.back(), k.chunk_noise);
    needles_.push_back({j, st});
  }

  // Index keys.
  keys_.assign(s.index_layers, std::vector<uint8_t>(chunks * s.IndexKeyBytes()));
  std::vector<float> v(is.dim);
  for (uint32_t l = 0; l < s.index_layers; ++l) {
    const uint32_t nope = is.dim - is.rope_dims;
    for (uint64_t j = 0; j < chunks; ++j) {
      const float* zj = z_.data() + j * r;
      for (uint32_t i = 0; i < nope; ++i) {
        double acc = 0;
        for (uint32_t q = 0; q < r; ++q) acc += w.b[l][size_t{i} * r + q] * zj[q];
        v[i] = static_cast<float>(acc);
      }
      std::fill(v.begin() + nope, v.end(), 0.0f);
      kernels::RotateIndexVector(is, j * c, v.data());
      kernels::CompressIndexKey(is.dim, v.data(), keys_[l].data() + j * s.IndexKeyBytes());
    }
  }

  // Attention per step: class q in {sharp, diffuse} x {plain, needle}. Logit of chunk j:
  // beta x_j (+ lambda nu_j), the sink's sigma. Masses are per chunk (token counts n_j).
  np_ = total_pages();
  nc_ = chunks;
  page_mass_.assign(size_t{config_.steps} * np_, 0.0f);
  labels_.assign(size_t{cycles()} * nc_, 0);
  sigma_.assign(size_t{config_.steps} * kClasses, 0.0f);
  std::vector<double> x(chunks), nu(chunks);
  std::vector<double> mass[kClasses];
  for (auto& m : mass) m.resize(chunks);
  uint32_t class_heads[64][kClasses];  // per layer: heads of each class (layers <= 64)
  if (s.layers > 64) return absl::InvalidArgumentError("at most 64 layers");
  std::vector<uint64_t> order;  // chunks 1.. by x descending (non-needle steps)
  uint32_t order_focus = kNone;
  uint64_t order_chunks = 0;
  std::vector<double> layer_mass(chunks);
  std::vector<uint64_t> tmp_order;
  for (uint32_t st = 0; st < config_.steps; ++st) {
    const uint64_t n_tok = tokens_at(st);
    const uint64_t nch = (n_tok + c - 1) / c;
    const std::vector<double> f = drifted(focus_[st], 1.0);
    if (order_focus != focus_[st]) {
      for (uint64_t j = 0; j < chunks; ++j) x[j] = Dot(z_.data() + j * r, f, r);
      order.resize(0);
      for (uint64_t j = 1; j < nch; ++j) order.push_back(j);
      std::sort(order.begin(), order.end(), [&](uint64_t a, uint64_t b) { return x[a] > x[b]; });
      order_focus = focus_[st];
      order_chunks = nch;
    }
    for (; order_chunks < nch; ++order_chunks) {  // a new chunk: insert in order
      const uint64_t j = order_chunks;
      order.insert(std::upper_bound(order.begin(), order.end(), j,
                                    [&](uint64_t a, uint64_t b) { return x[a] > x[b]; }),
                   j);
    }
    int needle = -1;
    for (size_t n = 0; n < needles_.size(); ++n)
      if (needles_[n].step == st) needle = static_cast<int>(n);
    if (needle >= 0)
      for (uint64_t j = 0; j < nch; ++j) nu[j] = Dot(z_.data() + j * r, needle_dir[needle], r);
    for (uint32_t l = 0; l < s.layers; ++l) {
      std::fill(class_heads[l], class_heads[l] + kClasses, 0);
      for (uint32_t h = 0; h < s.q_heads; ++h)
        ++class_heads[l][w.diffuse[l * s.q_heads + h] + 2 * (needle >= 0 && w.retrieval[l])];
    }
    for (uint32_t q = 0; q < kClasses; ++q) {
      bool used = false;
      for (uint32_t l = 0; l < s.layers; ++l) used |= class_heads[l][q] > 0;
      if (!used) continue;
      const double beta = (q & 1) ? k.diffuse_beta : k.sharp_beta;
      const double lambda = (q & 2) ? k.needle_gain : 0.0;
      double mx = -1e300;
      for (uint64_t j = 1; j < nch; ++j) mx = std::max(mx, beta * x[j] + lambda * nu[j]);
      double zr = 0;
      for (uint64_t j = 1; j < nch; ++j) {
        const double nj = double(std::min<uint64_t>(c, n_tok - j * c));
        zr += (mass[q][j] = nj * std::exp(beta * x[j] + lambda * nu[j] - mx));
      }
      // The sink (c tokens, or fewer) holds sink_share of the head's attention.
      const double n0 = double(std::min<uint64_t>(c, n_tok));
      const double sink_w = k.sink_share / (1 - k.sink_share) * zr;
      sigma_[size_t{st} * kClasses + q] = static_cast<float>(std::log(sink_w / n0) + mx);
      const double total = zr + sink_w;
      mass[q][0] = sink_w / total;
      for (uint64_t j = 1; j < nch; ++j) mass[q][j] /= total;
    }
    // Page masses, head-averaged over every layer.
    float* pm = page_mass_.data() + size_t{st} * np_;
    const double per_head = 1.0 / (double(s.layers) * s.q_heads);
    const uint32_t cpp = s.ChunksPerPage();
    for (uint32_t l = 0; l < s.layers; ++l)
      for (uint32_t q = 0; q < kClasses; ++q)
        if (class_heads[l][q])
          for (uint64_t j = 0; j < nch; ++j)
            pm[j / cpp] += static_cast<float>(class_heads[l][q] * per_head * mass[q][j]);
    // Labels: per layer, the prefix (sink first, then by mass) holding top_p of the mass;
    // a chunk is labelled when it is in the prefixes of at least m layers.
    const uint32_t cycle = st / k.tau;
    const uint64_t label_chunks = indexed_chunks(cycle * k.tau);
    uint8_t* lab = labels_.data() + size_t{cycle} * nc_;
    lab[0] = 1;
    std::vector<uint64_t> prefix_len(s.layers);
    std::vector<uint32_t> votes(needle >= 0 ? nch : 0, 0);
    for (uint32_t l = 0; l < s.layers; ++l) {
      for (uint64_t j = 0; j < nch; ++j) {
        double m = 0;
        for (uint32_t q = 0; q < kClasses; ++q) m += class_heads[l][q] * mass[q][j];
        layer_mass[j] = m / s.q_heads;
      }
      const std::vector<uint64_t>* ord = &order;
      if (needle >= 0) {  // not monotone in x at a needle step: sort this layer's masses
        tmp_order.assign(order.begin(), order.end());
        std::sort(tmp_order.begin(), tmp_order.end(),
                  [&](uint64_t a, uint64_t b) { return layer_mass[a] > layer_mass[b]; });
        ord = &tmp_order;
      }
      double cum = layer_mass[0];
      uint64_t len = 0;
      while (cum < k.top_p && len < ord->size()) {
        if (needle >= 0) ++votes[(*ord)[len]];
        cum += layer_mass[(*ord)[len++]];
      }
      prefix_len[l] = len;
    }
    if (needle < 0) {  // one order for every layer: the m-th longest prefix decides
      std::sort(prefix_len.rbegin(), prefix_len.rend());
      for (uint64_t i = 0; i < prefix_len[k.label_layers - 1]; ++i)
        if (order[i] < label_chunks) lab[order[i]] = 1;
    } else {
      for (uint64_t j = 1; j < std::min(nch, label_chunks); ++j)
        if (votes[j] >= k.label_layers) lab[j] = 1;
    }
  }

  // Hidden state at every step. Slots: [focus ; the next focus, when it takes over within
  // tau steps and the switch is announced ; needles retrieved within tau steps ; 1].
  std::vector<uint8_t> announced(config_.steps, 0);
  for (uint32_t st = 1; st < config_.steps; ++st)
    if (focus_[st] != focus_[st - 1]) announced[st] = ud(rng) < k.anticipate;
  hidden_.assign(size_t{config_.steps} * hd_, 0.0f);
  for (uint32_t s0 = 0; s0 < config_.steps; ++s0) {
    const uint32_t s1 = std::min(config_.steps, s0 + k.tau);
    std::vector<double> u = drifted(focus_[s0], 1.0);
    u.resize(kHiddenSlots * r, 0.0);
    for (uint32_t st = s0 + 1; st < s1; ++st)
      if (focus_[st] != focus_[st - 1]) {
        if (announced[st]) {
          const std::vector<double> f2 = drifted(focus_[st], 1.0);
          for (uint32_t i = 0; i < r; ++i) u[r + i] = f2[i];
        }
        break;
      }
    for (size_t n = 0; n < needles_.size(); ++n)
      if (needles_[n].step >= s0 && needles_[n].step < s1)
        for (uint32_t i = 0; i < r; ++i) u[2 * r + i] += needle_dir[n][i];
    u.push_back(1.0);  // bias
    double un = 0;
    for (double e : u) un += e * e;
    const double sd = k.hidden_noise * std::sqrt(un / hd_);
    float* h = hidden_.data() + size_t{s0} * hd_;
    for (uint32_t i = 0; i < hd_; ++i) {
      double acc = 0;
      for (uint32_t q = 0; q < u.size(); ++q) acc += w.wh[size_t{i} * u.size() + q] * u[q];
      h[i] =
          static_cast<float>(acc * std::sqrt(double(hd_)) + sd * std::sqrt(double(hd_)) * nd(rng));
    }
  }
  a_ = w.a;
  key_noise_ = w.key_noise;
  for (const auto& a : a_) {
    std::vector<float> t(a.size());
    for (uint32_t i = 0; i < s.head_dim; ++i)
      for (uint32_t j = 0; j < r; ++j) t[size_t{j} * s.head_dim + i] = a[size_t{i} * r + j];
    at_.push_back(std::move(t));
  }
  diffuse_ = w.diffuse;
  retrieval_ = w.retrieval;
  needle_dir_ = needle_dir;
  for (uint32_t st = 0; st < config_.steps; ++st)
    if (!focus_dir_.count(focus_[st])) focus_dir_[focus_[st]] = drifted(focus_[st], 1.0);
  return absl::OkStatus();
}

void Session::QueryLatent(uint32_t step, uint32_t layer, uint32_t head, float* y) const {
  const ModelSpec& s = spec();
  const Knobs& k = config_.knobs;
  int needle = -1;
  for (size_t n = 0; n < needles_.size(); ++n)
    if (needles_[n].step == step) needle = static_cast<int>(n);
  const bool diffuse = diffuse_[layer * s.q_heads + head];
  const bool retr = needle >= 0 && retrieval_[layer];
  const double beta = diffuse ? k.diffuse_beta : k.sharp_beta;
  const std::vector<double>& f = focus_dir_.at(focus_[step]);
  for (uint32_t i = 0; i < r_; ++i)
    y[i] = static_cast<float>(beta * f[i] + (retr ? k.needle_gain * needle_dir_[needle][i] : 0.0));
  y[kSinkDim] = sigma_[size_t{step} * kClasses + diffuse + 2 * retr];
}

void Session::ModelQuery(uint32_t step, uint32_t layer, uint32_t head, float* q) const {
  const ModelSpec& s = spec();
  std::vector<float> y(r_);
  QueryLatent(step, layer, head, y.data());
  const std::vector<float>& a = a_[layer * s.kv_heads + head / (s.q_heads / s.kv_heads)];
  const float inv_scale = 1.0f / s.Scale();
  for (uint32_t i = 0; i < s.head_dim; ++i) {
    double acc = 0;
    for (uint32_t j = 0; j < r_; ++j) acc += a[size_t{i} * r_ + j] * y[j];
    q[i] = static_cast<float>(acc * inv_scale);
  }
}

uint32_t Session::FillPage(uint64_t page, uint8_t* payload) const {
  const ModelSpec& s = spec();
  const uint64_t total = config_.prefill_tokens + config_.steps;
  const uint64_t t0 = page * s.page_tokens;
  const uint32_t n =
      static_cast<uint32_t>(std::min<uint64_t>(s.page_tokens, total > t0 ? total - t0 : 0));
  std::memset(payload, 0, s.PageBytes());
  const size_t es = DTypeSize(s.dtype);
  auto put = [&](size_t elem, float v) {
    uint8_t* p = payload + elem * es;
    if (s.dtype == DType::kFp32) {
      std::memcpy(p, &v, 4);
    } else {
      const uint16_t h = s.dtype == DType::kBf16 ? FloatToBf16(v) : FloatToFp16(v);
      std::memcpy(p, &h, 2);
    }
  };
  std::vector<float> kv(s.head_dim);
  for (uint32_t l = 0; l < s.layers; ++l)
    for (uint32_t g = 0; g < s.kv_heads; ++g) {
      std::vector<float> k(s.head_dim);
      for (uint32_t t = 0; t < n; ++t) {
        if (t == 0 || (t0 + t) % s.chunk_tokens == 0)
          ChunkKey(l, g, (t0 + t) / s.chunk_tokens, k.data());
        const float* nz = NoiseOf(l, g, t0 + t);
        for (uint32_t i = 0; i < s.head_dim; ++i) put(s.ElemOffset(l, 0, g, t) + i, k[i] + nz[i]);
        ValueOf(l, g, t0 + t, kv.data());
        for (uint32_t i = 0; i < s.head_dim; ++i) put(s.ElemOffset(l, 1, g, t) + i, kv[i]);
      }
    }
  return n;
}

void Session::ValueOf(uint32_t layer, uint32_t g, uint64_t token, float* v) const {
  // Unit-variance uniform values, a function of (session, layer, kv head, token).
  uint64_t x = Mix(config_.seed ^ Mix((uint64_t{layer} << 48) ^ (uint64_t{g} << 40) ^ token));
  for (uint32_t i = 0; i < spec().head_dim; ++i) {
    x = Mix(x);
    v[i] = static_cast<float>((double(x >> 11) * 0x1.0p-53 * 2 - 1) * 1.7320508);
  }
}

void Session::DenseOutput(uint32_t step, uint32_t layer, uint32_t head, float* o) const {
  const ModelSpec& s = spec();
  std::vector<float> y(r_);
  QueryLatent(step, layer, head, y.data());
  const uint64_t n = tokens_at(step), nch = (n + s.chunk_tokens - 1) / s.chunk_tokens;
  std::vector<double> logit(nch);
  double mx = -1e300;
  for (uint64_t j = 0; j < nch; ++j) {
    double d = 0;
    for (uint32_t i = 0; i < r_; ++i) d += double(y[i]) * z_[j * r_ + i];
    mx = std::max(mx, logit[j] = d);
  }
  double z = 0;
  std::vector<double> acc(s.head_dim, 0.0);
  std::vector<float> v(s.head_dim);
  const uint32_t g = head / (s.q_heads / s.kv_heads);
  for (uint64_t t = 0; t < n; ++t) {
    const double p = std::exp(logit[t / s.chunk_tokens] - mx);
    z += p;
    ValueOf(layer, g, t, v.data());
    for (uint32_t i = 0; i < s.head_dim; ++i) acc[i] += p * v[i];
  }
  for (uint32_t i = 0; i < s.head_dim; ++i) o[i] = static_cast<float>(acc[i] / z);
}

const float* Session::NoiseOf(uint32_t layer, uint32_t g, uint64_t token) const {
  const uint64_t b = Mix(config_.seed * 0x9e3779b97f4a7c15ull ^ token) % kNoiseBank;
  return key_noise_[layer * spec().kv_heads + g].data() + b * spec().head_dim;
}

void Session::ChunkKey(uint32_t layer, uint32_t g, uint64_t chunk, float* k) const {
  // K without the token's variation: A z_chunk, as axpys over A's transposed rows.
  const uint32_t d = spec().head_dim;
  const float* at = at_[layer * spec().kv_heads + g].data();
  const float* zj = z_.data() + chunk * r_;
  std::fill(k, k + d, 0.0f);
  for (uint32_t j = 0; j < r_; ++j)
    for (uint32_t i = 0; i < d; ++i) k[i] += zj[j] * at[size_t{j} * d + i];
}

void Session::PageBounds(uint64_t page, const std::vector<uint32_t>& layers, float* out) const {
  const ModelSpec& s = spec();
  const uint32_t d = s.head_dim, c = s.chunk_tokens;
  const uint64_t total = config_.prefill_tokens + config_.steps;
  const uint64_t t0 = page * s.page_tokens, t1 = std::min<uint64_t>(total, t0 + s.page_tokens);
  std::vector<float> k(d);
  for (size_t li = 0; li < layers.size(); ++li)
    for (uint32_t g = 0; g < s.kv_heads; ++g) {
      float* mn = out + (li * s.kv_heads + g) * 2 * d;
      float* mx = mn + d;
      for (uint32_t i = 0; i < d; ++i) mn[i] = 1e30f, mx[i] = -1e30f;
      for (uint64_t ch = t0 / c; ch * c < t1; ++ch) {
        ChunkKey(layers[li], g, ch, k.data());
        for (uint64_t t = std::max(t0, ch * c); t < std::min(t1, (ch + 1) * c); ++t) {
          const float* nz = NoiseOf(layers[li], g, t);
          for (uint32_t i = 0; i < d; ++i)
            mn[i] = std::min(mn[i], k[i] + nz[i]), mx[i] = std::max(mx[i], k[i] + nz[i]);
        }
      }
    }
}

}  // namespace fm::workload
