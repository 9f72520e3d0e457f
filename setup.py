"""The one thing pyproject.toml cannot say: the own int8 kernel, a C extension that may fail to build.

`optional=True`: without a C compiler the install still succeeds, with a warning ("building extension
... failed"), and the int8 mode runs on fbgemm (service/inference/int8kernel.py says why and when each is
used). The extension uses CPython's stable ABI, so the wheel (cp311-abi3-linux_x86_64) installs on the
server's Python 3.11 (Debian 12) whatever Python 3.11+ built it.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[Extension(
        "service.inference._int8", ["service/inference/_int8.c"], py_limited_api=True, optional=True,
        # -fopenmp links libgomp.so.1: at run time that is the copy torch already loaded (same soname), so the
        # kernel and torch share one OpenMP runtime and one team of threads.
        extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
