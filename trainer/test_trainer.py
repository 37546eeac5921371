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
                        "--val", self.paths[1], "--out", out, "--epochs", "1", "--rank", "8"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tower = QueryTower.load(out)
        self.assertEqual((tower.layers, tower.heads, tower.dim, tower.hidden, tower.rank), (1, 4, 64, 256, 8))
        _, meta = load_safetensors(out)
        self.assertEqual(meta["rope_dims"], "32")


if __name__ == "__main__":
    unittest.main()
