"""A one-minute CUDA smoke check of the bindings: the SST bucket (D=30, R=18) forward and backward in bf16/fp16,
contiguous and strided, against the float64 oracle, and the error for a bucket left out of the build.

    RFSR_KERNELS=dqk48_dv32 python setup.py build_ext --inplace && python scripts/gpu_smoke.py
"""
import torch, rfsr_cuda
from rfsr_cuda.ops.reference import flash_rfbias_reference as ref
torch.manual_seed(0)
ok = True
for dt in (torch.bfloat16, torch.float16):
    for strided in (False, True):
        B,N,H,D,R = 5,257,6,30,18
        if strided:
            buf = torch.randn(B,N,3,H,D,device="cuda",dtype=dt); q,k,v = (buf[:,:,i] for i in range(3))
        else:
            q,k,v = (torch.randn(B,N,H,D,device="cuda",dtype=dt) for _ in range(3))
        bq,bk = (0.5*torch.randn(H,N,R,device="cuda",dtype=dt) for _ in range(2))
        ls = [t.detach().requires_grad_() for t in (q,k,v,bq,bk)]
        o = rfsr_cuda.flash_rfbias(*ls); g = torch.randn_like(o); o.backward(g)
        rl = [t.detach().double().requires_grad_() for t in (q,k,v,bq,bk)]
        r = ref(*rl); r.backward(g.double())
        e = [((a.grad.double()-b.grad).norm()/b.grad.norm()).item() for a,b in zip(ls,rl)]
        eo = ((o.double()-r).norm()/r.norm()).item()
        print(dt, strided, "out", eo, "grads", e); ok &= eo < 1e-2 and max(e) < 2e-2
try:
    x = torch.randn(2,64,2,64,device="cuda",dtype=torch.bfloat16); b = torch.randn(2,64,8,device="cuda",dtype=torch.bfloat16)
    rfsr_cuda.flash_rfbias(x,x,x,b,b)
    print("no error for an uncompiled bucket"); ok = False
except ValueError as e:
    print("clear error:", str(e).splitlines()[0][:120])
print("QUICK CHECK", "PASSED" if ok else "FAILED")
