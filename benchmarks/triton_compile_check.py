"""Compile our Triton grouped-GEMM kernels for an H100 (sm_90) on any machine, no GPU needed.

Each of the six calls the expert backward and forward make is compiled at DBRX's shapes (d_model 6144, ffn 10752,
16 experts), its arguments specialised as Triton's JIT would at launch (unit strides become constants, sizes
divisible by 16 are marked so), for every autotuning config, and the PTX is checked: Hopper tensor-core
instructions (wgmma), software-pipelined loads (cp.async), and for every call at least one config whose shared
memory fits the H100's 227 KiB. Exit 0 when all hold, 1 when one does not, 77 when this Triton cannot do this
check (no NVIDIA backend, or an older compile API).

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
except Exception as e:  # noqa: BLE001
    print(f"cannot check here: {type(e).__name__}: {e}")
    sys.exit(77)

SHARED_LIMIT = 227 * 1024  # H100: dynamic shared memory per block

D, F, E, R = 6144, 10752, 16, 32768


def compile_call(kernel, cfg, ptrs, ints, consts):
    fn = kernel.fn  # the JITFunction under the autotuner
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
calls = {  # name: (kernel, pointer types, int args, constexprs)
    "up (x @ w1^T, v1^T)": (tg._rows_kernel, rp, UP, dict(ROWS, HAS2=True, SHARE_A=True, ADD2=False)),
    "down (h @ w2)": (tg._rows_kernel, rp, DOWN, dict(ROWS, HAS2=False, SHARE_A=True, ADD2=False)),
    "dh (dy @ w2^T)": (tg._rows_kernel, rp, UP, dict(ROWS, HAS2=False, SHARE_A=True, ADD2=False)),
    "dx (dg @ w1 + du @ v1)": (tg._rows_kernel, rp, DOWN, dict(ROWS, HAS2=True, SHARE_A=False, ADD2=True)),
    "dw2 (h^T dy)": (tg._wgrad_kernel, wp, WGRAD, dict(HAS2=False, IEEE=False, UPCAST=False)),
    "dw1,dv1 (dg^T x)": (tg._wgrad_kernel, wp, WGRAD, dict(HAS2=True, IEEE=False, UPCAST=False)),
}


def main() -> int:
    quick = "--quick" in sys.argv
    print("triton", triton.__version__, "target sm_90")
    bad = 0
    for name, (kernel, ptrs, ints, consts) in calls.items():
        fits = False
        for cfg in tg._CONFIGS:
            if quick and fits:
                break
            k = cfg.kwargs
            tile = f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"
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
            wgmma, cp_async = ptx.count("wgmma.mma_async"), ptx.count("cp.async")
            fits |= shared <= SHARED_LIMIT
            problems = [p for p, bad_ in (("no wgmma", not wgmma), ("not pipelined", not cp_async)) if bad_]
            bad += bool(problems)
            print(f"{name:24} {tile:20} wgmma {wgmma:2}  cp.async {cp_async:3}  shared {shared // 1024:3} KiB"
                  f"{'  (over the limit: autotuning skips it)' if shared > SHARED_LIMIT else ''}"
                  f"{'  ' + ', '.join(problems).upper() if problems else ''}")
        if not fits:
            bad += 1
            print(f"{name:24} NO CONFIG FITS IN {SHARED_LIMIT // 1024} KiB OF SHARED MEMORY")
    print("ok" if not bad else f"{bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
