"""Autograd Functions of the fused ops and their ``torch.library`` registrations, one file per op:
``mufa.py``, ``qlinear.py``, ``mga.py`` (Triton kernels from ``rspeft_fast.kernels``) and ``triplet.py``
(the C++/CUDA extension ``rspeft_fast._C``). Imported lazily by the modules."""
