#!/usr/bin/env python3
"""Compares the tensors two safetensors files share: relative L2 error per tensor.

Usage: compare_tensors.py REFERENCE CANDIDATE [--tol 1e-3]
Exits non-zero when a shared tensor's relative error exceeds the tolerance or when the candidate
lacks a loss/gradient tensor of the reference.
"""
import argparse
import sys

import numpy as np
from safetensors.numpy import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("reference")
    ap.add_argument("candidate")
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args()
    ref, cand = load_file(a.reference), load_file(a.candidate)
    worst, bad = 0.0, []
    print(f"{'tensor':<28} {'shape':<20} {'|ref|':>12} {'rel. error':>11} {'max |diff|':>11}")
    for name in sorted(ref):
        if name not in cand:
            if name.startswith("loss.") or name.endswith(".grad") or name == "lengths":
                bad.append(f"{name}: missing")
            continue
        r = ref[name].astype(np.float64)
        c = cand[name].astype(np.float64)
        if r.shape != c.shape:
            bad.append(f"{name}: shape {c.shape} vs {r.shape}")
            continue
        norm = np.linalg.norm(r)
        err = np.linalg.norm(r - c) / max(norm, 1e-30)
        worst = max(worst, err)
        print(f"{name:<28} {str(list(r.shape)):<20} {norm:>12.4e} {err:>11.2e} {np.abs(r - c).max():>11.2e}")
        if err > a.tol:
            bad.append(f"{name}: relative error {err:.2e} > {a.tol:g}")
    print(f"worst relative error {worst:.2e} (tolerance {a.tol:g})")
    if bad:
        print("MISMATCH:\n  " + "\n  ".join(bad))
        sys.exit(1)


if __name__ == "__main__":
    main()
