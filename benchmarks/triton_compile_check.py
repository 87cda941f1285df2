"""Compile our Triton kernels (grouped GEMMs, paged attention) for an H100 (sm_90) on any machine, no GPU needed.

Each of the six calls the expert backward and forward make is compiled at DBRX's shapes (d_model 6144, ffn 10752,
16 experts), its arguments specialised as Triton's JIT would at launch (unit strides become constants, sizes
divisible by 16 are marked so), for every autotuning config, and the PTX is checked: Hopper tensor-core
instructions (wgmma), software-pipelined loads (cp.async), and for every call at least one config whose shared
memory fits the H100's 227 KiB. Exit 0 when all hold, 1 when one does not, 77 when this Triton cannot do this
check (no NVIDIA backend, or an older compile API).

The paged-attention kernel is compiled at DBRX's attention shapes (hd 128, 8 KV heads, 48 query heads, 16-token
blocks) for its two tiles: the prefill tile (64 query rows) must use wgmma; the decode tile (16 rows, below a
warpgroup's 64) uses the older mma.sync tensor-core instructions instead. Both must pipeline their loads.

    python benchmarks/triton_compile_check.py [--quick]     # --quick: per call, stop at the first config that fits
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the interpreter

try:
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    import dbrx.kernels.triton_grouped_gemm as tg
    import dbrx.kernels.triton_paged_attention as tpa
except Exception as e:  # noqa: BLE001
    print(f"cannot check here: {type(e).__name__}: {e}")
    sys.exit(77)

SHARED_LIMIT = 227 * 1024  # H100: dynamic shared memory per block

D, F, E, R = 6144, 10752, 16, 32768


def compile_call(kernel, cfg, ptrs, ints, consts):
    fn = kernel if isinstance(kernel, triton.runtime.JITFunction) else kernel.fn  # (the one under an autotuner)
    sig, cst, attrs = {}, dict(consts, **cfg.kwargs), {}
    for name in fn.arg_names:
        if name in ptrs:
            sig[name] = ptrs[name]
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
        elif name in ints:
            ty, spec = native_specialize_impl(BaseBackend, ints[name], False, True, True)
            if ty == "constexpr":
                cst[name] = spec
                sig[name] = "constexpr"
            else:
                sig[name] = ty
                if spec == "D":
                    attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in cst.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 128),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


P = "*bf16"
rp = dict(a_ptr=P, b_ptr=P, a2_ptr=P, b2_ptr=P, c_ptr=P, c2_ptr=P, bounds_ptr="*i32")
wp = dict(a_ptr=P, a2_ptr=P, b_ptr=P, c_ptr=P, c2_ptr=P, bounds_ptr="*i32")
# the strides the wrappers pass: a (R, K) row-major; b an (E, K, N) view of w1^T / v1^T (unit K stride) or of w2
# (unit N stride); wgrad reads two row-major (R, .) operands
UP = dict(R=R, N=F, K=D, s_am=D, s_ak=1, s_be=F * D, s_bk=1, s_bn=D, s_cm=F, s_cn=1)  # x (R, D) @ w^T: (R, F)
DOWN = dict(R=R, N=D, K=F, s_am=F, s_ak=1, s_be=F * D, s_bk=D, s_bn=1, s_cm=D, s_cn=1)  # h (R, F) @ w: (R, D)
WGRAD = dict(M=F, N=D, s_ar=F, s_am=1, s_br=D, s_bn=1, s_ce=F * D, s_cm=D, s_cn=1)  # a_e^T (F, R_e) @ b_e (R_e, D)
ROWS = dict(E=E, IEEE=False, UPCAST=False, GROUP_M=tg.GROUP_M)
gemm_calls = {  # name: (kernel, pointer types, int args, constexprs)
    "up (x @ w1^T, v1^T)": (tg._rows_kernel, rp, UP, dict(ROWS, HAS2=True, SHARE_A=True, ADD2=False)),
    "down (h @ w2)": (tg._rows_kernel, rp, DOWN, dict(ROWS, HAS2=False, SHARE_A=True, ADD2=False)),
    "dh (dy @ w2^T)": (tg._rows_kernel, rp, UP, dict(ROWS, HAS2=False, SHARE_A=True, ADD2=False)),
    "dx (dg @ w1 + du @ v1)": (tg._rows_kernel, rp, DOWN, dict(ROWS, HAS2=True, SHARE_A=False, ADD2=True)),
    "dw2 (h^T dy)": (tg._wgrad_kernel, wp, WGRAD, dict(HAS2=False, IEEE=False, UPCAST=False)),
    "dw1,dv1 (dg^T x)": (tg._wgrad_kernel, wp, WGRAD, dict(HAS2=True, IEEE=False, UPCAST=False)),
}
# name: (kernel, configs, pointer types, int args, constexprs, the tensor-core instruction the PTX must hold)
calls = {name: (kernel, tg._CONFIGS, *args, "wgmma.mma_async") for name, (kernel, *args) in gemm_calls.items()}

# paged attention, q as the model passes it: a (N, H, hd) view of (1, H, N, hd); caches (NB, BS, kvH, hd)
HD, KVH, G, BS, N, MAXB = 128, 8, 6, 16, 4096, 512
ap = dict(q_ptr=P, k_ptr=P, v_ptr=P, o_ptr=P, tables_ptr="*i64", q_start_ptr="*i32", seq_len_ptr="*i32",
          tile_seq_ptr="*i32", tile_idx_ptr="*i32")
ATTN = dict(scale=0.1275, s_qn=HD, s_qh=N * HD, s_on=G * KVH * HD, s_oh=HD, s_kb=BS * KVH * HD, s_kt=KVH * HD,
            s_kh=HD, s_vb=BS * KVH * HD, s_vt=KVH * HD, s_vh=HD, s_ts=MAXB)
ATTN_C = dict(HD=HD, G=G, BS=BS, IEEE=False, UPCAST=False, BLOCK_D=HD)


def _tile(t):
    return triton.Config({"BLOCK_M": t[0], "BLOCK_N": t[1]}, num_warps=t[2], num_stages=t[3])


calls["attn prefill"] = (tpa._paged_attention_kernel, [_tile(tpa.PREFILL_TILE)], ap, ATTN, ATTN_C, "wgmma.mma_async")
calls["attn decode"] = (tpa._paged_attention_kernel, [_tile(tpa.DECODE_TILE)], ap, ATTN, ATTN_C, "mma.sync.aligned")


def main() -> int:
    quick = "--quick" in sys.argv
    print("triton", triton.__version__, "target sm_90")
    bad = 0
    for name, (kernel, configs, ptrs, ints, consts, mma) in calls.items():
        fits = False
        for cfg in configs:
            if quick and fits:
                break
            k = cfg.kwargs
            tile = "x".join(str(k[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if b in k)
            tile += f" w{cfg.num_warps} s{cfg.num_stages}"
            try:
                ck = compile_call(kernel, cfg, ptrs, ints, consts)
            except TypeError as e:  # the compile API of another Triton version
                print(f"cannot check here: {e}")
                return 77
            except Exception as e:  # noqa: BLE001
                bad += 1
                print(f"{name:24} {tile:20} COMPILE FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            ptx, shared = ck.asm["ptx"], ck.metadata.shared
            mmas, cp_async, short = ptx.count(mma), ptx.count("cp.async"), mma.split(".")[0]
            fits |= shared <= SHARED_LIMIT
            problems = [p for p, bad_ in ((f"no {short}", not mmas), ("not pipelined", not cp_async)) if bad_]
            bad += bool(problems)
            print(f"{name:24} {tile:20} {short:5} {mmas:2}  cp.async {cp_async:3}  shared {shared // 1024:3} KiB"
                  f"{'  (over the limit: autotuning skips it)' if shared > SHARED_LIMIT else ''}"
                  f"{'  ' + ', '.join(problems).upper() if problems else ''}")
        if not fits:
            bad += 1
            print(f"{name:24} NO CONFIG FITS IN {SHARED_LIMIT // 1024} KiB OF SHARED MEMORY")
    print("ok" if not bad else f"{bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
