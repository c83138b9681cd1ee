"""Compile every Triton kernel for sm_90 (H100/H200) exactly as its launches would, without a GPU; report resources.

Run as a script with the interpreter off (tests/test_sm90_resources.py does this in a subprocess):

    TRITON_INTERPRET=0 python tests/sm90_kernels.py OUT.json [--cache DIR] [--tokens N ...] [--modes MODE ...]

It calls the real launch functions (`sink_attention_triton.forward`, `row_delta`, `backward` and
`importance_triton.attention_importance`) on CPU tensors laid out as on a GPU (q, k, v as views of timm's packed
qkv, outputs as the launch functions allocate them), with Triton patched only where it would touch a driver:

- `JITFunction.run(warmup=True)` (a compile: what the autotuner's pruning and the deterministic choice call)
  specialises the arguments with the JIT's own binder and the NVIDIA backend (`native_specialize_impl`: unit strides
  become constexprs, 16-divisible pointers and integers get divisibility hints), compiles for
  `GPUTarget("cuda", 90, 32)` and returns what the pruning reads (`.metadata.shared`);
- `JITFunction.run(warmup=False)` (a launch) compiles the same way and records it instead of running it;
- `Autotuner.run` records the launch; the script then asks the autotuner for its pruned configs itself (there is
  no GPU to benchmark on);
- `shared_memory_limit` is sm_90's 232,448 bytes per program.

Every compile is recorded with its shared memory (`metadata.shared`), registers, stack and local memory (spill
bytes per thread; `cuobjdump --dump-resource-usage`, shipped in Triton's NVIDIA backend), whether its PTX uses
`wgmma`, and the structure of its main loop read from the TTGIR (`loop_structure`): matrix products, exponentials,
global loads and atomics per iteration, what tail masks cost (`mask_ops`: TTGIR selects, PTX `selp`s and predicated
memory operations) and its cache key (`key`: equal keys are one compile). Spills show up as stack bytes (ptxas
puts them in the stack frame). The returned stand-in for a compiled kernel carries `n_spills` (stack + local
bytes / 4, what the driver reports for a GPU's kernel), so the autotuner's pruning drops spilling configs here as it
does on a device.

Cost: each compile's record is cached in `DIR/compiles.json` under a key made of what the code depends on: the
source of the kernel and of every jit function and constexpr it names, transitively (not their line numbers, so
editing the Python around the kernels recompiles nothing, and editing one kernel recompiles only that kernel), the
specialisation, the compile options (config included), the Triton and ptxas versions. A warm run compiles only what
a change touched; Triton's own cache (`DIR/triton`) backs it up. The cases (dtype x head dim x token count, a
shape's modes together) are spread over `--jobs` processes (default: one per CPU), each writing its compiles to a
shard `DIR/compiles.part-I.json` that the parent merges into compiles.json; the records come out in the same order
as from one process. Cache files are written through a rename, so a killed run leaves them readable.
The default DIR is $FASTPROMPT_SM90_CACHE or ~/.cache/fastprompt-sm90.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

SM90_SHARED_MEMORY = 232_448  # bytes of shared memory one program may use on sm_90 (227 KiB)
DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (64, 80, 128)
BATCH, HEADS, TOKENS = 2, 12, 1025  # ViT-B/16 at 512 px
DIVISIBLE = ["tt.divisibility", 16]  # the hint the NVIDIA backend attaches to 16-divisible pointers and integers
RECORD_VERSION = 3  # bump when a compile record gains a field: cached records are then recomputed
MODES = {"autotuned": False, "deterministic": True}  # --modes: FASTPROMPT_DETERMINISTIC off / on
LOOP_OPS = {  # TTGIR operations counted per main-loop iteration
    "dots": r"(?:tt\.dot|ttng\.warp_group_dot)",
    "exp2": r"math\.exp2",
    "loads": r"(?:tt\.load|ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local)",
    "atomics": r"tt\.atomic_rmw",
}


def loop_structure(ttgir: str) -> dict:
    """Operations inside the kernel's main loop (the `scf.for` with the most matrix products), counted from TTGIR.

    Helpers are inlined by then, so a product written once inside the loop counts once per iteration, and the
    pipeliner's prologue copies sit outside the loop. Counts per op name of LOOP_OPS, 0 for a kernel without a loop.
    """
    loops, open_loops = [], []  # closed loops' counts; [brace depth, counts] of each loop still open
    for line in ttgir.splitlines():
        op = line.strip()
        for _, counts in open_loops:
            for name, pattern in LOOP_OPS.items():
                counts[name] += len(re.findall(rf"(?:^|= ){pattern}\b(?!_)", op))
        if re.search(r"\bscf\.for\b", op):
            open_loops.append([0, dict.fromkeys(LOOP_OPS, 0)])
        for entry in open_loops:
            entry[0] += op.count("{") - op.count("}")
        while open_loops and open_loops[-1][0] <= 0:
            loops.append(open_loops.pop()[1])
    loops += [counts for _, counts in open_loops]
    return max(loops, key=lambda counts: counts["dots"], default=dict.fromkeys(LOOP_OPS, 0))


def mask_ops(ttgir: str, ptx: str) -> dict:
    """What tail masks cost in a compiled kernel: TTGIR `arith.select`s, PTX `selp`s (a masked async copy picks its
    source size with one) and PTX global loads, stores and atomics under a predicate."""
    return {
        "selects": len(re.findall(r"= arith\.select\b", ttgir)),
        "selp": len(re.findall(r"^\s*selp\.", ptx, flags=re.MULTILINE)),
        "predicated": len(re.findall(r"^\s*@!?%p\d+\s+(?:ld|st|atom|red)\.global", ptx, flags=re.MULTILINE)),
    }


def default_cache() -> Path:
    return Path(os.environ.get("FASTPROMPT_SM90_CACHE") or Path.home() / ".cache" / "fastprompt-sm90")


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastprompt, as pytest imports it
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="JSON file to write the records to")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: ~/.cache/fastprompt-sm90)")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    parser.add_argument("--head-dims", nargs="*", type=int, default=list(HEAD_DIMS))
    parser.add_argument("--tokens", nargs="*", type=int, default=[TOKENS], help="token counts N (default: 1025)")
    parser.add_argument("--modes", nargs="*", choices=list(MODES), default=list(MODES))
    parser.add_argument("--record", type=Path, default=None, help="also write the run's time as a benchmarks record")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes (default: CPUs)")
    parser.add_argument("--part", type=int, default=None, help=argparse.SUPPRESS)  # a --jobs worker: its index
    parser.add_argument(
        "--masks-record",
        type=Path,
        default=None,
        help="with --tokens RAGGED EVEN: write their mask operations as a record",
    )
    args = parser.parse_args(argv)
    if args.masks_record and len(args.tokens) != 2:
        parser.error("--masks-record compares two token counts: --tokens RAGGED EVEN")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run with TRITON_INTERPRET=0: the interpreter replaces the compiler")
    cache = args.cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")  # read by triton's cache manager at compile time
    started = time.perf_counter()
    cases = [
        (count, name, dim, MODES[mode])
        for count in args.tokens
        for name in args.dtypes
        for dim in args.head_dims
        for mode in args.modes
    ]
    if args.part is not None:  # a worker of --jobs: its share of the cases, its compiles in its own shard of the cache
        owners = case_owners(len(cases), args.jobs, len(args.modes))
        harness = Harness(cache / f"compiles.part-{args.part}.json", shared=cache / "compiles.json")
        by_case = harness.run([case for case, owner in zip(cases, owners) if owner == args.part])
        payload = {"by_case": by_case, "hits": harness.hits, "misses": harness.misses}
        args.out.write_text(json.dumps(payload))
        return
    if args.jobs > 1 and len(cases) > len(args.modes):
        jobs = min(args.jobs, len(cases) // len(args.modes))
        options = ["--cache", str(cache), "--dtypes", *args.dtypes, "--modes", *args.modes, "--jobs", str(jobs)]
        options += ["--head-dims", *map(str, args.head_dims), "--tokens", *map(str, args.tokens)]
        records, hits, misses = run_parts(cache, case_owners(len(cases), jobs, len(args.modes)), options)
    else:
        harness = Harness(cache / "compiles.json")
        records = [record for case in harness.run(cases) for record in case]
        hits, misses = harness.hits, harness.misses
    seconds = time.perf_counter() - started
    payload = {"seconds": seconds, "limit": SM90_SHARED_MEMORY, "records": records}
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"{len(records)} launches, {misses} compiled, {hits} from the cache, {seconds:.1f} s")
    if args.record:
        from benchmarks.results import run_record, write_record

        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # ptxas and cuobjdump
        cpu = time.process_time() + children.ru_utime + children.ru_stime
        row = {"seconds": seconds, "cpu_seconds": cpu, "compiled": misses, "cached": hits, "launches": len(records)}
        config = {"dtypes": args.dtypes, "head_dims": args.head_dims, "jobs": args.jobs}
        config["cache"] = "cold" if not hits else "warm" if not misses else "partly warm"
        notes = [f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine)"]
        record = run_record("sm90_compile_check", "cpu", config, [row], notes)
        record["command"] = "TRITON_INTERPRET=0 python " + " ".join(sys.argv)
        write_record(record, args.record)
    if args.masks_record:
        from benchmarks.results import run_record, write_record

        config = {"dtypes": args.dtypes, "head_dims": args.head_dims, "batch": BATCH, "heads": HEADS}
        config.update(ragged_tokens=args.tokens[0], even_tokens=args.tokens[1], target="sm_90, compiled offline")
        notes = [
            "selects: TTGIR arith.select; selp: PTX selp (a masked cp.async picks its source size with one); "
            "predicated: PTX global ld/st/atom/red under a predicate",
            "launch 1 of _column_mass_kernel is the 'cls' pass: one query row, ragged at any token count",
        ]
        record = run_record("sm90_tail_masks", "cpu", config, mask_rows(records, *args.tokens), notes)
        record["device"] = "cpu (offline sm_90 compile)"
        record["command"] = "TRITON_INTERPRET=0 python " + " ".join(sys.argv)
        write_record(record, args.masks_record)


def case_owners(count: int, jobs: int, modes: int) -> list[int]:
    """Which of `jobs` workers runs each of `count` cases: a shape's modes stay together (they share compiles)."""
    return [(case // modes) % jobs for case in range(count)]


def run_parts(cache: Path, owners: list[int], options: list[str]) -> tuple[list[dict], int, int]:
    """Run the cases in worker processes (case i in worker owners[i]), then merge their compile records into
    `cache`/compiles.json. Returns the launch records in case order (as one process lists them), hits and misses."""
    jobs = max(owners) + 1
    with tempfile.TemporaryDirectory() as scratch:
        outs = [Path(scratch) / f"part-{index}.json" for index in range(jobs)]
        workers = [
            subprocess.Popen([sys.executable, __file__, str(out), *options, "--part", str(index)])
            for index, out in enumerate(outs)
        ]
        failed = [index for index, worker in enumerate(workers) if worker.wait() != 0]
        if failed:
            raise SystemExit(f"compile workers {failed} failed (their errors are above)")
        parts = [json.loads(out.read_text()) for out in outs]
    shards = sorted(cache.glob("compiles.part-*.json"))
    write_atomically(cache / "compiles.json", json.dumps(read_resources(cache / "compiles.json")))
    for shard in shards:
        shard.unlink()
    by_case = [iter(part["by_case"]) for part in parts]
    records = [record for owner in owners for record in next(by_case[owner])]
    return records, sum(part["hits"] for part in parts), sum(part["misses"] for part in parts)


def read_resources(path: Path, shared: Path | None = None) -> dict:
    """The compile records in `path`, merged with every shard `compiles.part-*.json` beside it (and `shared`'s);
    an unreadable file (a cache) counts as empty."""
    resources = {}
    for source in [shared, *sorted(path.parent.glob("compiles.part-*.json")), path]:
        try:
            resources.update(json.loads(source.read_text()) if source and source.exists() else {})
        except (OSError, json.JSONDecodeError):
            print(f"ignoring an unreadable compile cache file {source}", file=sys.stderr)
    return resources


def write_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary file and a rename: a run killed mid-write leaves the old file whole."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def mask_rows(records: list[dict], ragged: int, even: int) -> list[dict]:
    """Each compile's mask operations at `ragged` and `even` tokens, paired by launch (kernel, dtype, head dim, mode
    and its launches of that kernel so far) and config."""

    def compiles(tokens: int) -> list[tuple[dict, int, dict]]:
        seen: dict[tuple, int] = {}
        found = []
        for record in records:
            if record["tokens"] == tokens:
                case = (record["kernel"], record["dtype"], record["head_dim"], record["deterministic"])
                seen[case] = seen.get(case, -1) + 1
                found += [(record, seen[case], compiled) for compiled in record["compiled"]]
        return found

    rows = []
    for (record, launch, r), (_, _, e) in zip(compiles(ragged), compiles(even), strict=True):
        row = {key: record[key] for key in ("kernel", "dtype", "head_dim")}
        row.update(launch=launch, mode="deterministic" if record["deterministic"] else "autotuned", config=r["config"])
        row.update({f"ragged_{op}": r[op] for op in ("selects", "selp", "predicated")})
        row.update({f"even_{op}": e[op] for op in ("selects", "selp", "predicated")})
        rows.append(row)
    return rows


class Harness:
    """Patches Triton at its driver boundary, drives the launch functions and collects compile records."""

    def __init__(self, resource_cache: Path, shared: Path | None = None) -> None:
        import torch  # noqa: F401  (import order: torch before fastprompt and triton users)
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction, create_function_from_signature

        import fastprompt  # noqa: F401  (torchvision shim)

        self.triton, self.ASTSource = triton, ASTSource
        self.target = GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        self.backend_hash = self.backend.hash()  # includes the ptxas version
        self.binders = {}
        self.create_binder = create_function_from_signature
        self.cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        self.resource_cache = resource_cache
        self.resources = read_resources(resource_cache, shared)
        self.hits = self.misses = 0  # compiles answered by the cache, and compiled
        self.compiles: list[dict] = []  # every compile since the last reset
        self.launches: list[tuple] = []  # (kernel, grid, args, kwargs) of every launch since the last reset
        harness = self

        def jit_run(kernel, *args, grid, warmup, **kwargs):
            compiled = harness.compile(kernel, args, kwargs)
            if not warmup:
                harness.launches.append((kernel, grid, args, kwargs))
            return compiled

        def autotuner_run(tuned, *args, grid, warmup, **kwargs):
            harness.launches.append((tuned, grid, args, kwargs))

        JITFunction.run = jit_run
        Autotuner.run = autotuner_run
        from fastprompt.kernels import importance_triton, sink_attention_triton

        sink_attention_triton.shared_memory_limit = lambda device: SM90_SHARED_MEMORY
        self.sink, self.importance = sink_attention_triton, importance_triton

    def compile(self, kernel, args: tuple, kwargs: dict):
        """Compile `kernel` for sm_90 as JITFunction.run would for these arguments, and record its resources.

        Returns what the pruning reads (`.metadata.shared`): the compiled kernel, or on a cache hit its record.
        """
        if kernel not in self.binders:
            self.binders[kernel] = self.create_binder(kernel.signature, kernel.params, self.backend)
        bound, specialization, options = self.binders[kernel](*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(self.backend, kwargs, bound, specialization, options)
        key = self.cache_key(kernel, signature, constexprs, attrs, options)
        self.hits += key in self.resources
        self.misses += key not in self.resources
        if key not in self.resources:
            source = self.ASTSource(kernel, signature, constexprs, attrs)
            compiled = self.triton.compile(source, target=self.target, options=options.__dict__)
            self.resources[key] = {
                "shared": compiled.metadata.shared,
                **self.resource_usage(compiled),
                "wgmma": "wgmma.mma_async" in compiled.asm["ptx"],
                "mma_sync": "mma.sync" in compiled.asm["ptx"],
                "loop": loop_structure(compiled.asm["ttgir"]),
                **mask_ops(compiled.asm["ttgir"], compiled.asm["ptx"]),
            }
            write_atomically(self.resource_cache, json.dumps(self.resources))
        record = self.resources[key]
        self.compiles.append(
            {
                "kernel": kernel.__name__,
                "config": [kwargs.get("BLOCK_M"), kwargs.get("BLOCK_N"), options.num_warps, options.num_stages],
                "key": key,
                **record,
                "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                "constexprs": {kernel.arg_names[k[0]]: str(v) for k, v in constexprs.items()},
                "divisible_by_16": sorted(kernel.arg_names[k[0]] for k, v in attrs.items() if DIVISIBLE in v),
            }
        )
        spills = (record["stack"] + record["local"]) // 4  # Triton's n_spills: 4-byte words of local memory
        return SimpleNamespace(metadata=SimpleNamespace(shared=record["shared"]), n_spills=spills)

    def cache_key(self, kernel, signature, constexprs, attrs, options) -> str:
        """What the compiled code depends on: the source of the kernel and of every jit function and constexpr it
        names, transitively (not their line numbers, which Triton's own key includes), the specialisation, the
        options, and the Triton and backend (ptxas) versions."""
        import triton.language as tl
        from triton.runtime.jit import JITFunction

        sources, constants, pending = {}, {}, [kernel]
        while pending:
            function = pending.pop()
            sources[function.__name__] = function.src
            for name in set(re.findall(r"\b\w+\b", function.src)):
                value = function.__globals__.get(name)
                if isinstance(value, JITFunction) and value.__name__ not in sources:
                    pending.append(value)
                elif isinstance(value, tl.constexpr):
                    constants[name] = repr(value.value)
        specialisation = [
            signature,
            sorted((str(k), str(v)) for k, v in constexprs.items()),
            sorted(map(str, attrs.items())),
        ]
        versions = [self.triton.__version__, self.backend_hash, RECORD_VERSION]
        material = [kernel.__name__, sorted(sources.items()), sorted(constants.items()), specialisation]
        material += [options.__dict__, versions]
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()

    def resource_usage(self, compiled) -> dict:
        """Registers, stack and local bytes per thread of the cubin, from cuobjdump --dump-resource-usage."""
        with tempfile.TemporaryDirectory() as folder:
            cubin = Path(folder) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            text = subprocess.run(
                [str(self.cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
            ).stdout
        found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
        if set(found) != {"REG", "STACK", "LOCAL"}:
            raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{text}")
        return {"registers": int(found["REG"]), "stack": int(found["STACK"]), "local": int(found["LOCAL"])}

    def inputs(self, dtype, dim: int, tokens: int):
        """q, k, v as timm's Attention makes them (views of one packed qkv projection) and the EPT sink [N]."""
        import torch

        qkv = torch.randn(BATCH, tokens, 3, HEADS, dim).to(dtype).permute(2, 0, 3, 1, 4)
        sink = torch.zeros(tokens).expand(BATCH, HEADS, tokens)  # broadcast, as sink_attention passes it
        return qkv[0], qkv[1], qkv[2], sink

    def drive(self, dtype, dim: int, tokens: int) -> None:
        """Run every launch function once for this dtype and head dim (nothing executes; launches are recorded)."""
        import torch

        q, k, v, sink = self.inputs(dtype, dim, tokens)
        scale = dim**-0.5
        out, lse, _ = self.sink.forward(q, k, v, sink, scale)
        dout = torch.randn(BATCH, tokens, HEADS, dim).to(dtype).transpose(1, 2)  # as autograd hands it back
        delta = self.sink.row_delta(out, dout)
        self.sink.backward(dout, q, k, v, lse, delta, scale)
        self.importance.attention_importance(q, k, None, tokens, scale)  # 'global': both passes
        self.importance.attention_importance(q, k, lse, 1, scale)  # 'cls': one query row, the forward's lse

    def run(self, cases: list[tuple[int, str, int, bool]]) -> list[list[dict]]:
        """The launch records of each (tokens, dtype name, head dim, deterministic) case, case by case."""
        import torch

        records = []
        for count, name, dim, deterministic in cases:
            os.environ["FASTPROMPT_DETERMINISTIC"] = "1" if deterministic else "0"
            self.compiles, self.launches = [], []
            self.drive(getattr(torch, name), dim, count)
            records.append(self.collect(name, dim, deterministic, count))
        return records

    def collect(self, dtype: str, dim: int, deterministic: bool, tokens: int) -> list[dict]:
        """One record per launch: the configs compiled for it, those the pruning kept, the chosen or fixed one."""
        records = []
        for kernel, grid, args, kwargs in self.launches:
            record = {"dtype": dtype, "head_dim": dim, "deterministic": deterministic, "tokens": tokens}
            if hasattr(kernel, "prune_configs"):  # autotuned: the configs the pruning compiled and kept
                self.compiles = []
                kernel.nargs = dict(zip(kernel.arg_names, args))
                kept = kernel.prune_configs({"grid": grid, "warmup": False, **kwargs})
                kernel.nargs = None
                record.update(
                    kernel=kernel.fn.__name__,
                    space=[list(self.sink._shape(c)) for c in kernel.configs],
                    compiled=self.compiles,
                    kept=[list(self.sink._shape(c)) for c in kept],
                    grids={json.dumps(self.sink._shape(c)): list(grid(dict(kwargs, **c.kwargs))) for c in kept},
                )
            else:  # a plain launch: the deterministic config, or the fixed-block delta kernel
                self.compiles = []
                self.compile(kernel, args, kwargs)
                record.update(
                    kernel=kernel.__name__,
                    compiled=self.compiles,
                    kept=[self.compiles[0]["config"]],
                    grids={json.dumps(self.compiles[0]["config"]): list(grid(kwargs) if callable(grid) else grid)},
                )
            records.append(record)
        return records


if __name__ == "__main__":
    sys.exit(main())
