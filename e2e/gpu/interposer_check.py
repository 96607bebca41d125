#!/usr/bin/env python3
"""Checks the TensorFusion interposer on a real NVIDIA GPU with PyTorch.

Run by check-interposer.sh, which builds nothing and needs no network. Each check runs PyTorch in
a fresh child process with LD_PRELOAD of the interposer and a fresh pod directory holding the
container's limits file, the way the node agent would write it (docs/interposer.md):

1. vram: a 4 GiB limit shows as 4 GiB total in torch.cuda.mem_get_info, and allocating past it
   raises torch.cuda.OutOfMemoryError with no more than 4 GiB held (the caching allocator's
   cudaMalloc path; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, the VMM path; and
   backend:cudaMallocAsync, the stream-ordered path).
2. spill: with a 4 GiB spill quota the same process holds 6 GiB, and a kernel reading the
   spilled tensors computes the right answer (cudaMalloc path, expandable segments, whose
   handles past the limit are created in host memory, and the cudaMallocAsync backend, which
   also frees the spilled tensors with cudaFreeAsync and allocates again). Managed memory
   (cuMemAllocManaged through ctypes) past the limit spills too, its prefetch succeeds, and a
   kernel reading it through a zero-copy tensor sums it right.
3. compute: a matmul loop under a 30% share runs at 30% +- 5 points of its unlimited speed. The
   script plays the node agent's calibration step: it reads how many launch tokens per second the
   unlimited run used from the usage file and sets the refill rate to 30% of that.

Prints one PASS/FAIL line per check and a closing "N passed, N failed" line; exits non-zero on
any failure.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import time

GIB = 1 << 30
MIB = 1 << 20

# Usage file layout (docs/interposer.md): header 64 bytes, then 128-byte device blocks.
DEVICE_BLOCK_AT = 64
DEVICE_BLOCK_BYTES = 128
LAUNCHED_UNITS_WORD = 6
SPILL_WORD_BASE = 10
SLOTS_AT = 64 + 8 * 128
SLOT_BYTES = 160


def child(code, limits, extra_env=None, timeout=300):
    """Runs `code` in a Python child under the interposer; returns (parsed JSON, pod dir)."""
    pod = tempfile.mkdtemp(prefix="tf-pod-")
    with open(os.path.join(pod, "main.limits"), "w") as handle:
        handle.write("version=1\n")
        for key, value in limits.items():
            handle.write(f"{key}={value}\n")
    env = dict(os.environ)
    env.update(
        {
            "LD_PRELOAD": os.environ["TF_INTERPOSER"],
            "TF_POD_DIR": pod,
            "TF_CONTAINER_NAME": "main",
            "TF_LOG_LEVEL": os.environ.get("TF_LOG_LEVEL", "info"),
        }
    )
    env.update(extra_env or {})
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    sys.stderr.write(result.stderr[-4000:])
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({result.returncode}): {result.stdout[-2000:]}")
    return json.loads(lines[-1]), pod


def read_word(pod, offset):
    with open(os.path.join(pod, "main.shm"), "rb") as handle:
        handle.seek(offset)
        return struct.unpack("<Q", handle.read(8))[0]


def launched_units(pod, device=0):
    return read_word(pod, DEVICE_BLOCK_AT + device * DEVICE_BLOCK_BYTES + LAUNCHED_UNITS_WORD * 8)


# The child reads its own usage file while it still holds its tensors: spilled bytes held on
# device 0, summed over the process slots (docs/interposer.md).
USAGE_READER = r"""
import os, struct
def spilled_bytes():
    with open(os.path.join(os.environ["TF_POD_DIR"], "main.shm"), "rb") as handle:
        data = handle.read()
    return sum(struct.unpack_from("<Q", data, %d + slot * %d + %d * 8)[0] for slot in range(128))
""" % (SLOTS_AT, SLOT_BYTES, SPILL_WORD_BASE)

VRAM_CODE = r"""
import json, torch
free, total = torch.cuda.mem_get_info()
held, oom = [], False
try:
    for _ in range(64):
        held.append(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
except torch.cuda.OutOfMemoryError:
    oom = True
try:
    reserved = torch.cuda.memory_reserved()
except Exception:  # an allocator backend without the statistic
    reserved = -1
print(json.dumps({"total": total, "free": free, "oom": oom,
                  "held": len(held) * (256 << 20), "reserved": reserved}))
"""


ALLOC_CONF = {
    "caching": {},
    "expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    "async": {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"},
}


def check_vram(allocator):
    result, _ = child(VRAM_CODE, {"vram_limit": 4 * GIB}, ALLOC_CONF[allocator])
    ok = result["total"] == 4 * GIB and result["oom"] and result["held"] <= 4 * GIB
    if allocator != "async":
        # The stream-ordered pool reports its own reservation, which includes freed blocks.
        ok = ok and result["reserved"] <= 4 * GIB
    return ok, result


SPILL_CODE = USAGE_READER + r"""
import json, torch
held = [torch.full((256 << 20,), 1, dtype=torch.uint8, device="cuda") for _ in range(24)]
total = sum(int(t.sum(dtype=torch.int64).item()) for t in held)
spilled = spilled_bytes()
# Free everything (cudaFreeAsync under the async backend: spilled blocks go back to the host once
# the stream passes the frees) and allocate the same again.
del held
torch.cuda.synchronize()
again = [torch.full((256 << 20,), 2, dtype=torch.uint8, device="cuda") for _ in range(24)]
total_again = sum(int(t.sum(dtype=torch.int64).item()) for t in again)
print(json.dumps({"held": len(again) * (256 << 20), "sum": total, "sum_again": total_again,
                  "spilled_while_held": spilled, "spilled_at_end": spilled_bytes()}))
"""


def check_spill(allocator):
    result, _ = child(
        SPILL_CODE, {"vram_limit": 4 * GIB, "spill_quota": 4 * GIB}, ALLOC_CONF[allocator]
    )
    ok = (
        result["held"] == 6 * GIB
        and result["sum"] == 6 * GIB
        and result["sum_again"] == 12 * GIB
        and 2 * GIB <= result["spilled_while_held"] <= 4 * GIB
        and result["spilled_at_end"] <= 4 * GIB
    )
    return ok, result


MANAGED_CODE = USAGE_READER + r"""
import ctypes, json, torch
torch.zeros(1, device="cuda")  # a context, as any PyTorch program has
cuda = ctypes.CDLL("libcuda.so.1")
size = 3 << 30
pointer = ctypes.c_uint64(0)
allocated = cuda.cuMemAllocManaged(ctypes.byref(pointer), ctypes.c_size_t(size), ctypes.c_uint(1))
prefetched = -1
total = -1
if allocated == 0:
    ctypes.memset(ctypes.c_void_p(pointer.value), 1, size)
    prefetched = cuda.cuMemPrefetchAsync(
        ctypes.c_uint64(pointer.value), ctypes.c_size_t(size), ctypes.c_int(0), ctypes.c_void_p(0))
    class Managed:
        __cuda_array_interface__ = {"shape": (size,), "typestr": "|u1",
                                    "data": (pointer.value, False), "version": 3}
    view = torch.as_tensor(Managed(), device="cuda")
    total = int(view.sum(dtype=torch.int64).item())
    del view
spilled = spilled_bytes()
freed = cuda.cuMemFree_v2(ctypes.c_uint64(pointer.value)) if allocated == 0 else -1
print(json.dumps({"allocated": allocated, "prefetched": prefetched, "sum": total,
                  "spilled_while_held": spilled, "freed": freed,
                  "spilled_at_end": spilled_bytes()}))
"""


def check_managed_spill():
    result, _ = child(MANAGED_CODE, {"vram_limit": 2 * GIB, "spill_quota": 4 * GIB})
    ok = (
        result["allocated"] == 0
        and result["prefetched"] == 0
        and result["sum"] == 3 * GIB
        and result["spilled_while_held"] == 3 * GIB
        and result["freed"] == 0
        and result["spilled_at_end"] == 0
    )
    return ok, result


MATMUL_CODE = r"""
import json, time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
for _ in range(20):
    a @ b
torch.cuda.synchronize()
start, iterations = time.monotonic(), 0
while time.monotonic() - start < SECONDS:
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    iterations += 10
elapsed = time.monotonic() - start
print(json.dumps({"iterations": iterations, "seconds": elapsed}))
"""


def check_compute(share=0.30, seconds=30):
    code = MATMUL_CODE.replace("SECONDS", str(seconds))
    base, base_pod = child(code, {"vram_limit": 16 * GIB})
    base_rate = base["iterations"] / base["seconds"]
    tokens_per_second = launched_units(base_pod) / base["seconds"]
    limited, _ = child(
        code,
        {
            "vram_limit": 16 * GIB,
            "tflops_request": 1,
            "tflops_limit": 1,
            "refill_rate": f"{share * tokens_per_second:.6e}",
            "burst_seconds": 0.05,
        },
    )
    limited_rate = limited["iterations"] / limited["seconds"]
    ratio = limited_rate / base_rate
    detail = {
        "unlimited_iterations_per_second": base_rate,
        "limited_iterations_per_second": limited_rate,
        "ratio": ratio,
        "tokens_per_gpu_second": tokens_per_second,
    }
    return abs(ratio - share) <= 0.05, detail


def main():
    if "TF_INTERPOSER" not in os.environ:
        sys.exit("TF_INTERPOSER must name libtensor_fusion_interposer.so")
    checks = [
        ("vram limit 4 GiB (cudaMalloc path)", lambda: check_vram("caching")),
        ("vram limit 4 GiB (expandable segments / VMM path)", lambda: check_vram("expandable")),
        ("vram limit 4 GiB (cudaMallocAsync backend)", lambda: check_vram("async")),
        ("spill 2 GiB past a 4 GiB limit (cudaMalloc path)", lambda: check_spill("caching")),
        ("spill 2 GiB past a 4 GiB limit (expandable segments / VMM path)",
         lambda: check_spill("expandable")),
        ("spill 2 GiB past a 4 GiB limit (cudaMallocAsync backend)", lambda: check_spill("async")),
        ("spill of 3 GiB managed memory past a 2 GiB limit", check_managed_spill),
        ("matmul at 30% share", check_compute),
    ]
    passed = failed = 0
    for name, check in checks:
        started = time.monotonic()
        try:
            ok, detail = check()
        except Exception as error:  # a failed child is a failed check, not a crash
            ok, detail = False, {"error": str(error)}
        took = time.monotonic() - started
        print(f"{'PASS' if ok else 'FAIL'} {name} ({took:.0f} s): {json.dumps(detail)}", flush=True)
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
