"""Deployment runtimes that time a network: each returns a callable that runs one synchronised forward.

``torch`` runs the fused eval module; ``onnxruntime`` exports it with torch's own ONNX exporter (the TorchScript
one, ``dynamo=False``: the dynamo exporter needs onnxscript, which is not installed, and Ultralytics' exporter may
try to pip-install at run time), checks the graph with ``onnx.checker`` and times an InferenceSession;
``tensorrt`` builds an engine from that ONNX graph with TensorRT's parser.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
from typing import Callable

import torch

ONNX_OPSET = 17
BACKENDS = ("torch", "onnxruntime", "tensorrt")
Runner = Callable[[], object]


def backend_version(backend: str) -> str:
    """The installed version of the runtime that does the timing (part of a study's identity)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown latency backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if importlib.util.find_spec(backend) is None:
        return "not installed"
    # The module's own version string: it names the build (torch 2.14.1+cu130; onnxruntime-gpu ships as onnxruntime).
    return str(importlib.import_module(backend).__version__)


def make_runner(model: torch.nn.Module, backend: str, device: str, shape: tuple[int, int, int, int], half: bool,
                threads: int) -> Runner:
    """One forward of ``model`` (fused, eval) on ``backend`` for a zeros input of ``shape``, synchronised."""
    if backend == "torch":
        return _torch_runner(model, device, shape, half)
    if backend == "onnxruntime":
        return _onnxruntime_runner(model, device, shape, half, threads)
    if backend == "tensorrt":
        return _tensorrt_runner(model, shape, half)
    raise ValueError(f"unknown latency backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _torch_runner(model: torch.nn.Module, device: str, shape, half: bool) -> Runner:
    dev = torch.device("cuda:0" if device == "cuda" else "cpu")
    model = model.to(dev)
    dtype = torch.float16 if half else torch.float32
    model = model.to(dtype)
    x = torch.zeros(shape, device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run() -> None:
        with torch.inference_mode():
            model(x)
        sync()

    return run


def export_onnx(model: torch.nn.Module, shape, device: str = "cpu", half: bool = False) -> bytes:
    """The model as a checked ONNX graph (opset ``ONNX_OPSET``, one input ``images`` of fixed ``shape``)."""
    import onnx

    dev = torch.device("cuda:0" if device == "cuda" else "cpu")
    dtype = torch.float16 if half else torch.float32
    model = model.to(dev).to(dtype)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(shape, device=dev, dtype=dtype),), buf, dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["images"])
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)  # also runs shape inference over the whole graph
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset != ONNX_OPSET:
        raise RuntimeError(f"ONNX export produced opset {opset}, expected {ONNX_OPSET}")
    return buf.getvalue()


def _onnxruntime_runner(model: torch.nn.Module, device: str, shape, half: bool, threads: int) -> Runner:
    import numpy as np
    import onnxruntime as ort

    graph = export_onnx(model, shape, device, half)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} has no {provider} (install onnxruntime-gpu for CUDA)")
    session = ort.InferenceSession(graph, options, providers=[provider])
    x = np.zeros(shape, dtype=np.float16 if half else np.float32)
    if device == "cuda":
        # Input bound once on the GPU, so the timing is the network, not a host-to-device copy per run.
        binding = session.io_binding()
        binding.bind_ortvalue_input("images", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")

        def run_cuda() -> None:
            session.run_with_iobinding(binding)  # returns after the device finished (synchronises its stream)

        return run_cuda
    feed = {"images": x}
    return lambda: session.run(None, feed)


def _tensorrt_runner(model: torch.nn.Module, shape, half: bool) -> Runner:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode of TensorRT >= 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(export_onnx(model, shape, "cuda", False)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    if half:
        config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build an engine (see its log)")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    buffers = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = torch.float16 if engine.get_tensor_dtype(name) == trt.DataType.HALF else torch.float32
        buf = torch.zeros(tuple(engine.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, buf.data_ptr())
        buffers.append(buf)  # kept alive with the runner
    stream = torch.cuda.Stream()

    def run() -> None:
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()

    run.buffers = buffers  # type: ignore[attr-defined]
    return run
