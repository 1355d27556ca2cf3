"""The size of a quantized forward's error per layer, the noise that matches it, and the massive activations.

usage: python benchmarks/quant_noise_scale.py REF_STORE QUANT_STORE [out=FILE.json] [top=3]

REF_STORE holds the unquantized forward's states, QUANT_STORE the quantized forward's (``model.quant``)
of the same prompts (same model, corpus, n_prompts and layers). Per layer it prints

- ``rms``: sqrt(mean over prompts of ‖q(h) − h‖²), the RMS L2 error, and ``median`` / ``rel``: its
  median, absolute and over ‖h‖;
- the massive activations of the reference states: the ``top`` dimensions by median |h_i| over the
  prompts, their median share of ‖h‖², and the median centred norm ‖h − mean‖ beside the median ‖h‖.

Last, the ``model.noise_scale`` list that matches the error (entry k = layer k's ``rms``; layers not
stored get 0), ready to pass to ``collide run model.noise=gaussian model.noise_scale=[...]``:
``collide.quant.add_noise`` adds an isotropic Gaussian of that RMS L2 norm.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from collide.store import open_store


def main(argv: list[str]) -> None:
    ref, quant, args = open_store(argv[0]), open_store(argv[1]), dict(a.split("=", 1) for a in argv[2:])
    top = int(args.get("top", 3))
    n = min(ref.n_rows, quant.n_rows)
    tokens_ref, tokens_q = (s.prompts(["token_ids"]).column(0).to_pylist()[:n] for s in (ref, quant))
    if tokens_ref != tokens_q:
        raise SystemExit("the two stores hold different prompts: same model, corpus and n_prompts are needed")
    layers = [k for k in ref.layers if k in quant.layers]
    report, scales = {"ref": str(ref.path), "quant": str(quant.path), "n": n, "layers": {}}, {}
    for k in layers:
        h = ref.layer(k)[1][:n].astype(np.float64)
        q = quant.layer(k)[1][:n].astype(np.float64)
        err, norm = np.linalg.norm(q - h, axis=1), np.linalg.norm(h, axis=1)
        dims = np.argsort(-np.median(np.abs(h), axis=0))[:top]
        share = np.median((h[:, dims] ** 2).sum(axis=1) / np.maximum(norm ** 2, 1e-300))
        centred = np.median(np.linalg.norm(h - h.mean(axis=0), axis=1))
        scales[k] = float(np.sqrt(np.mean(err ** 2)))
        report["layers"][k] = {"rms": scales[k], "median": float(np.median(err)),
                               "rel": float(np.median(err / np.maximum(norm, 1e-300))), "norm": float(np.median(norm)),
                               "centred_norm": float(centred), "massive_dims": dims.tolist(), "massive_share": float(share)}
        r = report["layers"][k]
        print(f"layer {k}: error rms {r['rms']:.4g}, median {r['median']:.4g} ({r['rel']:.3g} of ‖h‖); ‖h‖ {r['norm']:.4g}, "
              f"‖h - mean‖ {r['centred_norm']:.4g}; dims {r['massive_dims']} hold {r['massive_share']:.3f} of ‖h‖²")
    report["noise_scale"] = [round(scales.get(k, 0.0), 6) for k in range(int(ref.manifest["n_layers"]) + 1)]
    print("model.noise_scale=[" + ",".join(f"{v:.6g}" for v in report["noise_scale"]) + "]")
    if "out" in args:
        with open(args["out"], "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
