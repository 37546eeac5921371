"""Tests of the Python side (run by CTest): the NumPy trace reader, the dump converter's key
compression against traces the C++ generator wrote, and a one-epoch training run."""
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from convert_dump import compress_keys  # noqa: E402
from fm_indexer import QueryTower  # noqa: E402
from fm_trace import Trace, fp8_e4m3_table, load_safetensors  # noqa: E402

BIN = os.environ.get("FM_BIN_DIR", os.path.join(HERE, "..", "build", "bin"))


class TrainerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="fm_trainer_test")
        for seed in (11, 12):
            subprocess.run([os.path.join(BIN, "fmctl"), "gen", "--spec", "tiny", "--tokens", "4096",
                            "--steps", "128", "--tau", "64", "--seed", str(seed), "--out",
                            cls.dir],
                           check=True, stdout=subprocess.DEVNULL)
        cls.paths = sorted(os.path.join(cls.dir, f) for f in os.listdir(cls.dir))

    def test_reader_sees_the_generated_trace(self):
        t = Trace(self.paths[0])
        self.assertEqual((t.layers, t.q_heads, t.index_layers, t.index_dim), (2, 4, 1, 64))
        self.assertEqual(t.cycles, 2)
        self.assertEqual(t.keys_raw.shape, (1, (4096 + 128) // 4, 68))
        self.assertEqual(t.labels.shape, (2, t.chunks))
        np.testing.assert_allclose(t.page_mass.sum(1), 1.0, atol=1e-4)

    def test_fp8_table_is_the_e4m3_format(self):
        t = fp8_e4m3_table()
        self.assertEqual(t[0x7E], 448.0)
        self.assertEqual(t[0x01], 2.0 ** -9)
        self.assertEqual(t[0x08], 2.0 ** -6)
        self.assertEqual(t[0xC0], -2.0)
        self.assertTrue(np.isnan(t[0x7F]) and np.isnan(t[0xFF]))

    def test_converter_compresses_keys_exactly_like_the_indexer(self):
        t = Trace(self.paths[0])
        again = compress_keys(t.decoded_keys())
        np.testing.assert_array_equal(again, t.keys_raw)

    def test_one_epoch_of_training_exports_loadable_weights(self):
        out = os.path.join(self.dir, "w.safetensors")
        subprocess.run([sys.executable, os.path.join(HERE, "train_indexer.py"), "--train", self.paths[0],
                        "--val", self.paths[1], "--out", out, "--epochs", "1", "--rank", "8",
                        "--allow-degenerate"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tower = QueryTower.load(out)
        self.assertEqual((tower.layers, tower.heads, tower.dim, tower.hidden, tower.rank), (1, 4, 64, 256, 8))
        _, meta = load_safetensors(out)
        self.assertEqual(meta["rope_dims"], "32")


class TrainerRulesTest(unittest.TestCase):
    def test_a_tower_that_keeps_nothing_or_scores_flat_is_degenerate(self):
        from train_indexer import degenerate
        good = {"precision": 0.4, "recall": 0.7}
        self.assertIsNone(degenerate(good, 0.2))
        self.assertIn("precision and recall are 0",
                      degenerate({"precision": 0.0, "recall": 0.0}, 0.2))
        self.assertIn("does not vary", degenerate(good, 0.0))

    def test_validation_holds_out_a_tenth_of_the_traces_by_seed(self):
        from train_indexer import split
        paths = [f"t{i}" for i in range(25)]
        tr, va = split(paths, 3)
        self.assertEqual((len(tr), len(va)), (23, 2))
        self.assertEqual(sorted(tr + va), sorted(paths))
        self.assertEqual(split(paths, 3), (tr, va))
        tr1, va1 = split(paths[:3], 3)
        self.assertEqual((len(tr1), len(va1)), (2, 1))

    def test_a_degenerate_tower_is_not_written(self):
        d = tempfile.mkdtemp(prefix="fm_trainer_degenerate")
        for seed in (21, 22):
            subprocess.run([os.path.join(BIN, "fmctl"), "gen", "--spec", "tiny", "--tokens", "2048",
                            "--steps", "64", "--tau", "64", "--seed", str(seed), "--out", d],
                           check=True, stdout=subprocess.DEVNULL)
        out = os.path.join(d, "w.safetensors")
        # With --lr 0 the tower stays as initialised; seed 3's keeps no chunk above theta
        # (precision and recall 0), as a tower stuck in the warm-up does.
        r = subprocess.run([sys.executable, os.path.join(HERE, "train_indexer.py"), "--train",
                            os.path.join(d, "*.safetensors"), "--out", out, "--epochs", "2",
                            "--rank", "8", "--lr", "0", "--seed", "3"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        self.assertIn("degenerate tower", r.stdout)
        self.assertIn("validation: 1 of the training traces held out", r.stdout)
        self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
    unittest.main()
