"""Tests of the zoo's code: the tasks' generators (seeded, train and evaluation seeds
disjoint, answers where the needles say), the model's incremental decoder against its
whole-sequence forward, and the index keys the client sends (the model's own K, compressed
as the worker compresses)."""
import os
import sys
import unittest

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "zoo"))
import tasks as T  # noqa: E402
from model import Decoder, ModelConfig, Transformer  # noqa: E402
from serve import PAGE, prefill_arrays, spec_for  # noqa: E402


class TasksTest(unittest.TestCase):
    def test_samples_are_seeded_and_splits_differ(self):
        for task in T.TASKS:
            a, b = T.make(task, 3, 600, 2), T.make(task, 3, 600, 2)
            self.assertEqual(a.haystack, b.haystack)
            self.assertNotEqual(a.haystack, T.make(task, 3, 600, 2, eval_split=False).haystack)
            self.assertGreaterEqual(len(a.haystack), 600)

    def test_needles_hold_the_answers(self):
        s = T.make("recall", 1, 2000, 5)
        for prompt, answer, needles in s.questions:
            self.assertEqual([s.haystack[n] for n in needles], answer)
            k1, k2 = prompt[1], prompt[2]
            self.assertEqual(s.haystack[needles[0] - 3:needles[0] - 1], [k1, k2])
        s = T.make("vartrack", 1, 2000, 3)
        for prompt, answer, needles in s.questions:
            self.assertEqual([s.haystack[n] for n in needles], answer[0::2])
        s = T.make("passkey", 1, 2000, 1)
        (prompt, answer, needles), = s.questions
        self.assertEqual([s.haystack[n] for n in needles], answer)

    def test_task_weights_repeat_a_task_in_the_batch_cycle(self):
        import train
        self.assertEqual(train.task_cycle(""), T.TASKS)
        self.assertEqual(train.task_cycle("vartrack=3,frequent=0"),
                         ["recall", "multiquery", "vartrack", "vartrack", "vartrack", "passkey"])
        with self.assertRaises(SystemExit):
            train.task_cycle("varttrack=2")


class ModelTest(unittest.TestCase):
    def test_prefill_and_decoder_continue_the_forward_exactly(self):
        torch.manual_seed(0)
        cfg = ModelConfig(name="t", layers=["local", "global", "local", "global"],
                          shift_embeddings=3)
        m = Transformer(cfg)
        for b in m.blocks:
            b.canon.data.normal_(0, 0.3)
        toks = torch.tensor(T.make("recall", 2, 300, 2).haystack)
        full = m(toks[None])[0]
        dec = Decoder(m, m.prefill(toks[:-7]))
        for t in toks[-7:]:
            logits = dec.step(int(t))
        self.assertLess(float((logits - full[-1]).abs().max()), 1e-4)

    def test_index_keys_are_the_models_own_k_per_token(self):
        sys.path.insert(0, os.path.join(HERE, "..", "trainer"))
        from fm_trace import fp8_e4m3_table
        torch.manual_seed(1)
        m = Transformer(ModelConfig(name="t", layers=["local", "global"]))
        spec = spec_for(m)
        self.assertEqual((spec.layers, spec.index_layers, spec.index_heads, spec.index_dim),
                         (1, 1, 4, 4 * 2 * 32))
        toks = torch.tensor(T.make("passkey", 1, 200, 1).haystack)
        c = m.prefill(toks)
        pages, keys = prefill_arrays(m, c, len(toks))
        self.assertEqual(pages.shape, (-(-len(toks) // PAGE), spec.page_bytes))
        self.assertEqual(keys.shape, (1, len(toks) // 4, spec.index_dim + 4))
        k = c.k[1].numpy()  # [T, Hkv, d]
        table = fp8_e4m3_table()
        scale = keys[0, :, -4:].copy().view(np.float32)
        back = table[keys[0, :, :-4]] * scale
        want = k[:len(toks) // 4 * 4].reshape(len(toks) // 4, -1)
        np.testing.assert_allclose(back, want, rtol=0.07, atol=1e-6 + 0.07 * np.abs(want).max())
        # The pages hold K and V as the model's bf16 values, [layer][K|V][kv][token][d].
        kv = pages.view(np.uint16).reshape(-1, 1, 2, 2, PAGE, 32)
        got_k = (kv[0, 0, 0, 1, 5].astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(got_k, k[5, 1])


if __name__ == "__main__":
    unittest.main()
