"""SecAgg / SecAgg+ costs against the keystream limit, plaintext summation and Flower's SecAgg+.

Usage: ``python benchmarks/secagg.py [--quick] [--json PATH] [--threads N] [--flwr-python PATH]``

Three parts, all in one process run so baselines see the same machine load:

1. **Client hot path** (d = 1e6, k = 10, i.e. 11 mask streams): our client's
   encode + mask (:func:`securefed.protocols.secagg.masking.encode_and_mask`)
   against the *keystream-plus-add limit* for the same 11 AES-256-CTR streams:
   the faster of (a) expanding each whole stream into a preallocated buffer
   with ``update_into`` and adding it in place, and (b) the same, chunked.
   Repetitions are interleaved; medians of wall time and of process CPU time.
   ``client_mask_ratio_to_limit`` = ours / limit, both with ``--threads``
   worker threads (default 1).
2. **Flower**: the client masking path of ``flwr`` SecAgg+
   (``flwr.common.secure_aggregation``: ``parameters_multiply``,
   ``quantize``, ``factor_combine``, ``pseudo_rand_gen`` for the self mask and
   10 pairwise masks, additions, ``parameters_mod``, exactly the sequence of
   ``secaggplus_mod._collect_masked_vectors``) on the *same* float32 input
   (saved to a temporary .npy), in a subprocess of a separate virtual
   environment; its key agreement is done beforehand and timed separately, as
   ours is. Flower's defaults are used on both sides: clip 8.0, 2^22
   quantization levels (ours: scale_bits 18, the same step), modulus 2^32.
   ``speedup_vs_flwr_client`` = Flower's median / ours. Set the environment up
   once with::

       python3 -m venv ~/.cache/securefed-bench/flwr-venv
       ~/.cache/securefed-bench/flwr-venv/bin/pip install flwr

3. **Full rounds** through the loop's transport over n in {10, 50, 100, 200},
   d in {1e5, 1e6}, dropout in {0, 10%, 30%} (clients dropping at
   ``masked_input``, after sharing keys: the costliest case for the server),
   complete graph vs k-regular (k = 10 where the parameter finder accepts it
   for that dropout rate, else the finder's k). Client time split into key
   agreement, share generation, encoding+masking, share decryption and
   serialization (medians over clients); server time into summation, Shamir
   reconstruction, key agreement for dropped peers and mask regeneration;
   bytes per client; and, measured right after each round on the same data,
   plaintext float summation and the keystream-plus-add limit for the server's
   number of streams. ``server_unmask_s_n100_d1e6_drop10`` is the median over
   repetitions of that configuration (k = 10) of the whole unmasking step
   (Shamir + key agreement + summation + mask regeneration);
   ``upload_ratio_to_plaintext`` is bytes uploaded per client over 4 d there.

Targets on the 2-core machine: ratio <= 1.5, server <= 0.3 s, speedup >= 3,
upload ratio <= 1.1 at b = 32. Threat model for the grid: corrupt_fraction 0
(honest-but-curious server, no colluding clients), unauthenticated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from securefed.fl.transport import run_round
from securefed.protocols import AGGREGATORS, ClientInput
from securefed.protocols.csprng import byte_view, ctr_encryptor
from securefed.protocols.encoding import ChunkQuantizer, FixedPointEncoder
from securefed.protocols.errors import ConfigurationError, RoundAbortedError
from securefed.protocols.secagg.masking import MaskStream, apply_masks, encode_and_mask

CLIP = 8.0
SCALE_BITS = 18  # 2^22 levels over [-8, 8], Flower's default step
DEFAULT_FLWR = Path.home() / ".cache" / "securefed-bench" / "flwr-venv" / "bin" / "python"


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


# -- part 1: client hot path ---------------------------------------------------------------


def _naive_limit(d: int, seeds: list[bytes], threads: int) -> None:
    """Whole-stream keystream into a preallocated buffer, then an in-place uint32 add, per stream."""
    acc = np.zeros(d, dtype=np.uint32)
    bounds = np.linspace(0, d // 4, threads + 1).astype(int) * 4

    def part(lo: int, hi: int) -> None:
        buf = np.empty(hi - lo, dtype=np.uint32)
        zeros = bytes(4 * (hi - lo))
        view = byte_view(buf)
        out = acc[lo:hi]
        for s in seeds:
            ctr_encryptor(s, 4 * lo).update_into(zeros, view)
            np.add(out, buf, out=out)

    ranges = [(int(bounds[i]), int(bounds[i + 1]) if i < threads - 1 else d) for i in range(threads)]
    if threads == 1:
        part(0, d)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda r: part(*r), ranges))


def _chunked_limit(d: int, seeds: list[bytes], threads: int) -> None:
    acc = np.zeros(d, dtype=np.uint32)
    apply_masks(acc, [MaskStream(s) for s in seeds], modulus_bits=32, threads=threads)


def hot_path(d: int, k: int, reps: int, threads: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)  # benchmark input only
    x = (rng.standard_normal(d) * 0.5).astype(np.float32)
    enc = FixedPointEncoder(clip=CLIP, scale_bits=SCALE_BITS, modulus_bits=32)
    seeds = [os.urandom(32) for _ in range(k + 1)]
    streams = [MaskStream(s, negate=i % 2 == 1) for i, s in enumerate(seeds)]
    tail = np.array([int(CLIP * 2**SCALE_BITS), 0], dtype=np.int64)

    def ours() -> None:
        clipped = ChunkQuantizer(enc, 1.0, 1).count_clipped(x)
        encode_and_mask(x, tail, encoder=enc, weight=1.0, rounding_seed=os.urandom(32), streams=streams,
                        threads=threads, clipped=clipped)

    def encode_only() -> None:
        encode_and_mask(x, tail, encoder=enc, weight=1.0, rounding_seed=os.urandom(32), streams=[], threads=threads)

    series: dict[str, list[tuple[float, float]]] = {"naive": [], "chunked": [], "ours": [], "encode_only": []}
    fns = {"naive": lambda: _naive_limit(d + 2, seeds, threads), "chunked": lambda: _chunked_limit(d + 2, seeds, threads),
           "ours": ours, "encode_only": encode_only}
    for fn in fns.values():  # warm-up
        fn()
    for r in range(reps):
        order = list(fns)[r % 4:] + list(fns)[: r % 4]
        for name in order:
            series[name].append(_timed(fns[name]))
    wall = {k_: _median([w for w, _ in v]) for k_, v in series.items()}
    cpu = {k_: _median([c for _, c in v]) for k_, v in series.items()}
    limit_w = min(wall["naive"], wall["chunked"])
    limit_c = min(cpu["naive"], cpu["chunked"])
    return {
        "d": d, "k": k, "streams": k + 1, "threads": threads, "reps": reps,
        "wall_s": wall, "cpu_s": cpu,
        "limit_wall_s": limit_w, "limit_cpu_s": limit_c,
        "ratio_wall": wall["ours"] / limit_w, "ratio_cpu": cpu["ours"] / limit_c,
    }


# -- part 2: Flower ------------------------------------------------------------------------------

_FLWR_SCRIPT = r'''
import json, os, statistics, sys, time
import numpy as np
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine, parameters_addition, parameters_mod, parameters_multiply, parameters_subtraction)
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import generate_key_pairs
import flwr

x = np.load(sys.argv[1])
k, reps = int(sys.argv[2]), int(sys.argv[3])
clip, target, mod, max_weight = 8.0, 2 ** 22, 2 ** 32, 1000.0
sk, _ = generate_key_pairs()
peers = [generate_key_pairs()[1] for _ in range(k)]
t0 = time.perf_counter()
keys = [generate_shared_key(sk, pk) for pk in peers]
ka = time.perf_counter() - t0
rd_seed = os.urandom(32)
nid = 10 ** 6

def mask():
    ratio = 1.0 / max_weight
    q_ratio = round(ratio * target)
    dq_ratio = q_ratio / target
    params = parameters_multiply([x], dq_ratio)
    q = quantize(params, clip, target)
    q = factor_combine(q_ratio, q)
    dims = [a.shape for a in q]
    q = parameters_addition(q, pseudo_rand_gen(rd_seed, mod, dims))
    for node_id, key in enumerate(keys):
        m = pseudo_rand_gen(key, mod, dims)
        q = parameters_addition(q, m) if nid > node_id * 2 else parameters_subtraction(q, m)
    return parameters_mod(q, mod)

mask()
walls, cpus = [], []
for _ in range(reps):
    w, c = time.perf_counter(), time.process_time()
    mask()
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
print(json.dumps({"flwr_version": flwr.__version__, "mask_wall_s": statistics.median(walls),
                  "mask_cpu_s": statistics.median(cpus), "key_agreement_s": ka, "reps": reps}))
'''


def flower(python: Path, d: int, k: int, reps: int) -> dict[str, Any]:
    if not python.exists():
        return {"available": False, "reason": f"{python} not found; see this script's docstring for the setup command"}
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(d) * 0.5).astype(np.float32)  # the same input as part 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        np.save(path, x)
        script = Path(tmp) / "flwr_mask.py"
        script.write_text(_FLWR_SCRIPT)
        proc = subprocess.run([str(python), str(script), str(path), str(k), str(reps)], capture_output=True, text=True,
                              timeout=900, check=False)
    if proc.returncode != 0:
        return {"available": False, "reason": proc.stderr.strip()[-2000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["available"] = True
    return out


# -- part 3: full rounds ---------------------------------------------------------------------------


def _plaintext_sum(vectors: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    total = np.zeros(vectors[0].shape[0], dtype=np.float64)
    for v in vectors:
        total += v
    return time.perf_counter() - t0


def _stream_limit(length: int, streams: int, summands: int) -> float:
    """Keystream + in-place add for ``streams`` streams, plus ``summands`` uint32 additions."""
    acc = np.zeros(length, dtype=np.uint32)
    buf = np.empty(length, dtype=np.uint32)
    zeros, view = bytes(4 * length), byte_view(buf)
    t0 = time.perf_counter()
    for _ in range(summands):
        np.add(acc, buf, out=acc)
    for _ in range(streams):
        ctr_encryptor(os.urandom(32)).update_into(zeros, view)
        np.add(acc, buf, out=acc)
    return time.perf_counter() - t0


def run_config(n: int, d: int, drop: float, graph: str, threads: int, seed: int, k: int | None = None) -> dict[str, Any]:
    name = "secagg" if graph == "complete" else "secagg+"
    opts: dict[str, object] = dict(clip=CLIP, scale_bits=SCALE_BITS, modulus_bits=32, dropout_rate=drop,
                                   corrupt_fraction=0.0, threads=threads)
    row: dict[str, Any] = {"n": n, "d": d, "dropout": drop, "graph": graph}
    if graph == "harary":
        try:
            AGGREGATORS.create(name, k=k or 10, **opts).config.parameters(n)
            opts["k"] = k or 10
        except ConfigurationError as err:
            if k is not None:
                return {**row, "status": f"infeasible: {err}"}
            row["k_note"] = f"k=10 refused by the parameter finder ({err}); finder's k used"
    agg = AGGREGATORS.create(name, **opts)
    rng = np.random.default_rng(seed)  # benchmark inputs and dropout choice only
    inputs = {c: ClientInput((rng.standard_normal(d) * 0.5).astype(np.float32)) for c in range(n)}
    dropped = rng.choice(n, size=int(drop * n), replace=False)
    dropouts = {int(c): "masked_input" for c in dropped}
    rnd = agg.new_round(1, inputs)
    params = rnd.server.parameters
    row.update(k=params.k, threshold=params.threshold)
    t0 = time.perf_counter()
    try:
        out = run_round(rnd, agg.stages, dropouts)
    except RoundAbortedError as err:
        return {**row, "status": f"aborted: {err}"}
    row["round_wall_s"] = time.perf_counter() - t0
    res = out.result
    exact = sum(np.clip(inputs[c].vector.astype(np.float64), -CLIP, CLIP) for c in res.contributors)
    row["max_abs_error"] = float(np.max(np.abs(res.total - exact)))
    phases = ["key_agreement", "share_generation", "share_decryption", "encoding_and_masking", "serialization"]
    row["client_s"] = {p: _median([c.timings.seconds.get(p, 0.0) for c in rnd.clients.values()
                                   if c.party_id not in dropouts]) for p in phases}
    # The client fuses encoding into mask expansion; time encoding alone on one client's input to split them.
    enc = agg.config.encoder
    x0 = inputs[res.contributors[0]].vector
    tail = np.zeros(2, dtype=np.int64)
    enc_only = [_timed(lambda: encode_and_mask(x0, tail, encoder=enc, weight=1.0, rounding_seed=os.urandom(32),
                                               streams=[], threads=threads))[0] for _ in range(3)]
    row["client_s"]["encoding_only"] = _median(enc_only)
    row["client_s"]["masking_only_est"] = max(0.0, row["client_s"]["encoding_and_masking"] - _median(enc_only))
    sv = rnd.server.timings.seconds
    row["server_s"] = {p: sv.get(p, 0.0) for p in ("shamir", "key_agreement", "summation", "mask_regeneration")}
    row["server_unmask_s"] = sum(row["server_s"].values())
    cpu = rnd.server.timings.cpu_seconds
    row["server_cpu_s"] = {p: cpu.get(p, 0.0) for p in ("shamir", "key_agreement", "summation", "mask_regeneration")}
    row["server_unmask_cpu_s"] = sum(row["server_cpu_s"].values())
    up = [v for c, v in out.traffic.up.items() if c not in dropouts]
    down = [v for c, v in out.traffic.down.items() if c not in dropouts]
    row["bytes_up_per_client"] = _median([float(u) for u in up])
    row["bytes_down_per_client"] = _median([float(u) for u in down])
    row["upload_ratio_to_plaintext"] = row["bytes_up_per_client"] / (4 * d)
    streams = len(res.contributors) + sum(
        1 for i in res.contributors for j in rnd.server.graph.neighbours(i) if j in dropouts)
    row["server_streams"] = streams
    row["plaintext_sum_s"] = _plaintext_sum([inputs[c].vector for c in res.contributors])
    row["server_stream_limit_s"] = _stream_limit(d + 2, streams, len(res.contributors))
    row["server_ratio_to_stream_limit"] = row["server_unmask_s"] / row["server_stream_limit_s"]
    row["contributors"] = len(res.contributors)
    row["status"] = "ok"
    del rnd, out, inputs
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer configurations and repetitions")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--threads", type=int, default=1, help="mask-expansion threads for our client and server")
    ap.add_argument("--flwr-python", type=Path, default=DEFAULT_FLWR, help="python of the flwr benchmark venv")
    args = ap.parse_args(argv)
    reps = 9 if args.quick else 21
    d, k = 1_000_000, 10
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": os.getloadavg()},
        "settings": {"clip": CLIP, "scale_bits": SCALE_BITS, "modulus_bits": 32, "threads": args.threads,
                     "quick": args.quick},
    }
    print(f"[1/3] client hot path d={d} k={k} threads={args.threads}", flush=True)
    hp = hot_path(d, k, reps, args.threads)
    result["hot_path"] = hp
    if args.threads == 1:
        hp2 = hot_path(d, k, max(5, reps // 2), 2)
        result["hot_path_2_threads"] = hp2
    print(f"  limit {hp['limit_wall_s'] * 1e3:.2f} ms, ours {hp['wall_s']['ours'] * 1e3:.2f} ms "
          f"(encode alone {hp['wall_s']['encode_only'] * 1e3:.2f} ms): ratio {hp['ratio_wall']:.2f} wall, "
          f"{hp['ratio_cpu']:.2f} cpu", flush=True)

    print("[2/3] Flower SecAgg+ client masking on the same input", flush=True)
    fl = flower(args.flwr_python, d, k, 5 if args.quick else 9)
    result["flwr"] = fl
    if fl.get("available"):
        fl["speedup_wall"] = fl["mask_wall_s"] / hp["wall_s"]["ours"]
        fl["speedup_cpu"] = fl["mask_cpu_s"] / hp["cpu_s"]["ours"]
        print(f"  flwr {fl['flwr_version']}: {fl['mask_wall_s'] * 1e3:.1f} ms vs ours {hp['wall_s']['ours'] * 1e3:.2f} ms"
              f" -> speedup {fl['speedup_wall']:.1f}x (cpu {fl['speedup_cpu']:.1f}x)", flush=True)
    else:
        print(f"  flwr unavailable: {fl['reason'][:300]}", flush=True)

    print("[3/3] full rounds", flush=True)
    head = [run_config(100, d, 0.1, "harary", args.threads, seed=100 + r, k=10) for r in range(3 if args.quick else 5)]
    ok = [h for h in head if h["status"] == "ok"]
    result["headline_rounds"] = head
    if args.quick:
        grid_spec = [(n, dd, 0.1, g) for n in (10, 100) for dd in (100_000, 1_000_000) for g in ("complete", "harary")]
    else:
        grid_spec = [(n, dd, dr, g) for n in (10, 50, 100, 200) for dd in (100_000, 1_000_000)
                     for dr in (0.0, 0.1, 0.3) for g in ("complete", "harary")]
    grid = []
    for i, (n, dd, dr, g) in enumerate(grid_spec):
        row = run_config(n, dd, dr, g, args.threads, seed=i)
        grid.append(row)
        if row["status"] == "ok":
            print(f"  n={n:3d} d={dd:>7d} drop={dr:.1f} {g:8s} k={row['k']:3d} t={row['threshold']:3d} "
                  f"client enc+mask {row['client_s']['encoding_and_masking'] * 1e3:7.1f} ms "
                  f"ka {row['client_s']['key_agreement'] * 1e3:6.1f} ms shares {row['client_s']['share_generation'] * 1e3:6.1f} ms"
                  f" | server unmask {row['server_unmask_s']:.3f} s (shamir {row['server_s']['shamir'] * 1e3:.1f} ms,"
                  f" sum {row['server_s']['summation'] * 1e3:.0f} ms, masks {row['server_s']['mask_regeneration'] * 1e3:.0f} ms;"
                  f" x{row['server_ratio_to_stream_limit']:.2f} of stream limit) up x{row['upload_ratio_to_plaintext']:.4f}",
                  flush=True)
        else:
            print(f"  n={n:3d} d={dd:>7d} drop={dr:.1f} {g:8s} {row['status'][:150]}", flush=True)
    result["grid"] = grid
    result["machine"]["loadavg_end"] = os.getloadavg()

    result["client_mask_ratio_to_limit"] = hp["ratio_wall"]
    result["client_mask_ratio_to_limit_cpu"] = hp["ratio_cpu"]
    result["server_unmask_s_n100_d1e6_drop10"] = _median([h["server_unmask_s"] for h in ok]) if ok else None
    result["server_unmask_cpu_s_n100_d1e6_drop10"] = _median([h["server_unmask_cpu_s"] for h in ok]) if ok else None
    result["speedup_vs_flwr_client"] = fl.get("speedup_wall")
    result["upload_ratio_to_plaintext"] = _median([h["upload_ratio_to_plaintext"] for h in ok]) if ok else None
    ok_grid = [r for r in grid if r["status"] == "ok" and r["d"] >= 100_000]
    result["upload_ratio_to_plaintext_max_over_grid"] = max((r["upload_ratio_to_plaintext"] for r in ok_grid), default=None)
    result["targets"] = {"client_mask_ratio_to_limit": 1.5, "server_unmask_s_n100_d1e6_drop10": 0.3,
                         "speedup_vs_flwr_client": 3.0, "upload_ratio_to_plaintext": 1.1}
    print(json.dumps({k_: result[k_] for k_ in ("client_mask_ratio_to_limit", "client_mask_ratio_to_limit_cpu",
                                                "server_unmask_s_n100_d1e6_drop10", "server_unmask_cpu_s_n100_d1e6_drop10",
                                                "speedup_vs_flwr_client",
                                                "upload_ratio_to_plaintext", "upload_ratio_to_plaintext_max_over_grid")},
                     indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
