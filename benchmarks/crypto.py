"""Transport crypto throughput: the firmware model's batch seal+open against raw primitives.

Prints one JSON object. Everything is measured side by side in one run, through the same
library (cryptography, over the same OpenSSL), on the same bytes, one core, interleaved round
by round so that background load hits every contender alike:

- model: `seal_pages` then `open_pages` over the buffer in packets of `--page-size` bytes
  (AES-128-CTR with a fresh IV per packet, HMAC-SHA256 over AAD || ciphertext, every MAC
  checked before anything is decrypted), writing into reused buffers (`out=`), as the lab does
  with guest memory and send buffers; `model_alloc` is the same with fresh result buffers;
  `model_runs_of_16` / `model_runs_of_1` call the batch paths on runs of 16 pages / 1 page
  (scattered dirty pages), so the fixed cost of a call shows.
- raw_per_page: AES-128-CTR encrypt + HMAC-SHA256 with one call per page (a CTR cipher per
  page, since every packet has its own IV), then HMAC check + decrypt per page.
- raw_big_buffer: one AES-128-CTR call and one HMAC-SHA256 call over the whole buffer, each
  way (an upper bound no per-packet format can reach: no per-call cost at all).
- memory_model: `GuestMemoryCipher` over the buffer (one call per run) against raw CTR.

Throughputs are bytes of guest data per second through both directions (seal + open), in
GB/s (1e9), over the CPU time of the benchmark's thread (the machine is shared: CPU time is
what the work cost even while another process holds the core); wall-clock figures are given
too. Ratios are model / raw; the target is model >= 50% of raw.

    python -m benchmarks.crypto [--mib 64] [--rounds 5] [--page-size 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import cryptography
import numpy as np
from cryptography.hazmat.backends.openssl import backend
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevconsole.sev.memory import GuestMemoryCipher
from sevconsole.sev.transport import open_pages, seal_pages

TARGET = 0.5


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds): CPU time is what the work cost even when
    other processes on the machine take the core away for a while."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


class Raw:
    """The primitives with no packet format around them."""

    def __init__(self, tek: bytes, tik: bytes, data: bytes, page_size: int) -> None:
        self.aes = algorithms.AES(tek)
        self.mac = hmac.HMAC(tik, hashes.SHA256())
        self.data = data
        self.page = page_size
        self.pages = len(data) // page_size
        self.ivs = [os.urandom(16) for _ in range(self.pages)]
        self.ct_pages: list[bytes] = []
        self.tags: list[bytes] = []
        self.big_ct = bytearray(len(data) + 15)
        self.big_pt = bytearray(len(data) + 15)
        self.big_tag = b""

    def seal_per_page(self) -> None:
        view, size, aes, mac = memoryview(self.data), self.page, self.aes, self.mac
        cts, tags = [], []
        for p, iv in enumerate(self.ivs):
            ct = Cipher(aes, modes.CTR(iv)).encryptor().update(view[p * size : (p + 1) * size])
            h = mac.copy()
            h.update(ct)
            cts.append(ct)
            tags.append(h.finalize())
        self.ct_pages, self.tags = cts, tags

    def open_per_page(self) -> None:
        aes, mac = self.aes, self.mac
        for ct, tag, iv in zip(self.ct_pages, self.tags, self.ivs, strict=True):
            h = mac.copy()
            h.update(ct)
            h.verify(tag)
            Cipher(aes, modes.CTR(iv)).encryptor().update(ct)

    def seal_big(self) -> None:
        n = len(self.data)
        Cipher(self.aes, modes.CTR(self.ivs[0])).encryptor().update_into(self.data, self.big_ct)
        h = self.mac.copy()
        h.update(memoryview(self.big_ct)[:n])
        self.big_tag = h.finalize()

    def open_big(self) -> None:
        n = len(self.data)
        ct = memoryview(self.big_ct)[:n]
        h = self.mac.copy()
        h.update(ct)
        h.verify(self.big_tag)
        Cipher(self.aes, modes.CTR(self.ivs[0])).decryptor().update_into(ct, self.big_pt)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="buffer size in MiB (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--page-size", type=int, default=4096, help="packet size (default 4096)")
    args = parser.parse_args(argv)

    size = args.mib * 1024 * 1024
    data = os.urandom(size)
    tek, tik, vek = os.urandom(16), os.urandom(16), os.urandom(16)
    ct_buf, pt_buf = bytearray(size), bytearray(size)
    raw = Raw(tek, tik, data, args.page_size)
    memory = GuestMemoryCipher(vek)
    mem_out = bytearray(size)
    raw_ctr_out = bytearray(size + 15)

    state: dict[str, object] = {}

    def model_seal() -> None:
        state["headers"], _ = seal_pages(tek, tik, data, args.page_size, out=ct_buf)

    def model_open() -> None:
        open_pages(tek, tik, state["headers"], ct_buf, args.page_size, out=pt_buf)  # type: ignore[arg-type]

    def alloc_seal() -> None:
        state["a_headers"], state["a_ct"] = seal_pages(tek, tik, data, args.page_size)

    def alloc_open() -> None:
        state["a_pt"] = open_pages(tek, tik, state["a_headers"], state["a_ct"], args.page_size)  # type: ignore[arg-type]

    def runs_of(pages: int) -> tuple[Callable[[], None], Callable[[], None]]:
        """The model on short runs (the lab's later passes send scattered dirty pages)."""
        run = pages * args.page_size
        sent: list[list[bytes]] = []

        def seal() -> None:
            sent.clear()
            for a in range(0, size, run):
                headers, _ = seal_pages(
                    tek, tik, data_view[a : a + run], args.page_size, out=ct_view[a : a + run]
                )
                sent.append(headers)

        def open_() -> None:
            for i, a in enumerate(range(0, size, run)):
                open_pages(tek, tik, sent[i], ct_view[a : a + run], args.page_size,
                           out=pt_view[a : a + run])

        return seal, open_

    data_view, ct_view, pt_view = memoryview(data), memoryview(ct_buf), memoryview(pt_buf)
    contenders: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "model": (model_seal, model_open),
        "model_alloc": (alloc_seal, alloc_open),
        "model_runs_of_16": runs_of(16),
        "model_runs_of_1": runs_of(1),
        "raw_per_page": (raw.seal_per_page, raw.open_per_page),
        "raw_big_buffer": (raw.seal_big, raw.open_big),
        "memory_model": (
            lambda: memory.encrypt(0x1_0000_0000, data, out=mem_out),
            lambda: memory.decrypt(0x1_0000_0000, mem_out, out=mem_out),
        ),
        "memory_raw_ctr": (
            lambda: Cipher(algorithms.AES(vek), modes.CTR(bytes(16))).encryptor().update_into(data, raw_ctr_out),
            lambda: Cipher(algorithms.AES(vek), modes.CTR(bytes(16))).encryptor().update_into(data, raw_ctr_out),
        ),
    }
    # times[name] = one (forward (wall, cpu), back (wall, cpu)) per round
    times: dict[str, list[tuple[tuple[float, float], tuple[float, float]]]] = {
        name: [] for name in contenders
    }
    for _ in range(args.rounds + 1):  # the first round warms buffers and caches; dropped
        for name, (forward, back) in contenders.items():
            times[name].append((_timed(forward), _timed(back)))
    for name in times:
        times[name] = times[name][1:]

    if bytes(pt_buf) != data or state["a_pt"] != data or bytes(mem_out) != data:
        raise SystemExit("benchmark self-check failed: a round trip did not give the data back")

    def gbps(seconds: float) -> float:
        return round(size / seconds / 1e9, 3)

    def figures(name: str) -> dict[str, float]:
        rounds = times[name]
        cpu_both = [fwd[1] + back[1] for fwd, back in rounds]
        return {
            "forward_GBps": gbps(min(fwd[1] for fwd, _ in rounds)),
            "back_GBps": gbps(min(back[1] for _, back in rounds)),
            "round_trip_GBps": gbps(min(cpu_both)),
            "round_trip_median_GBps": gbps(statistics.median(cpu_both)),
            "round_trip_wall_GBps": gbps(min(fwd[0] + back[0] for fwd, back in rounds)),
        }

    result: dict[str, object] = {name: figures(name) for name in contenders}

    def ratio(a: str, b: str, key: str = "round_trip_GBps") -> float:
        return round(result[a][key] / result[b][key], 3)  # type: ignore[index]

    for raw_name, label in (("raw_per_page", "per_page"), ("raw_big_buffer", "big_buffer")):
        result[f"ratio_model_to_raw_{label}"] = ratio("model", raw_name)
        result[f"ratio_model_to_raw_{label}_median"] = ratio(
            "model", raw_name, "round_trip_median_GBps"
        )
        result[f"ratio_model_to_raw_{label}_wall"] = ratio("model", raw_name, "round_trip_wall_GBps")
        result[f"ratio_model_alloc_to_raw_{label}"] = ratio("model_alloc", raw_name)
    result["ratio_model_runs_of_1_to_raw_per_page"] = ratio("model_runs_of_1", "raw_per_page")
    result["ratio_model_runs_of_16_to_raw_per_page"] = ratio("model_runs_of_16", "raw_per_page")
    result["ratio_memory_model_to_raw_ctr"] = ratio("memory_model", "memory_raw_ctr")
    result["target"] = TARGET
    result["meets_target_vs_per_page"] = result["ratio_model_to_raw_per_page"] >= TARGET
    result["meets_target_vs_big_buffer"] = result["ratio_model_to_raw_big_buffer"] >= TARGET
    result["setup"] = {
        "bytes": size,
        "page_size": args.page_size,
        "packets": -(-size // args.page_size),
        "rounds": args.rounds,
        "threads": 1,
        "units": "GB/s = 1e9 bytes of guest data per second of this thread's CPU time (best "
        "round; _median: median round; _wall: best round in wall-clock time); forward = "
        "seal/encrypt, back = open/decrypt, round_trip = both",
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
