#!/usr/bin/python3
"""The baseline kennel-inference is measured against: a Python gRPC server
that serves a TorchScript classifier the way the original endpoint's
model_fn / input_fn / predict_fn did it. Each request is handled on its own
thread from a grpcio thread pool: PIL decodes the bytes, torchvision's
Resize / ToTensor / Normalize make the tensor, and the model runs on that one
image under torch.no_grad(). No batching, no reduced-scale decode, no bf16.

It speaks kennel.v1.Classifier/Classify, so the same client drives both.

Usage: python_baseline_server.py --model FILE --port N [--workers 8]
"""
import argparse
import io
import json
import sys
import time
from concurrent import futures

import grpc
import torch
from PIL import Image
from torchvision import transforms


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--stubs", required=True, help="directory of the kennel.v1 stubs")
    args = p.parse_args()
    sys.path.insert(0, args.stubs)
    from kennel.v1 import inference_pb2 as pb
    from kennel.v1 import inference_pb2_grpc as pb_grpc

    # model_fn
    model = torch.jit.load(args.model).eval()
    labels = list(model.labels)
    spec = json.loads(model.kennel_preprocessing)
    size = spec["input_size"]
    if spec.get("resize_mode", "RESIZE_MODE_SHORTER_SIDE_THEN_CROP") == "RESIZE_MODE_STRETCH":
        resize = [transforms.Resize((size, size))]
    else:
        resize = [transforms.Resize(spec.get("resize") or size), transforms.CenterCrop(size)]
    transform = transforms.Compose(resize + [
        transforms.ToTensor(), transforms.Normalize(spec["mean"], spec["std"])])

    class Servicer(pb_grpc.ClassifierServicer):
        def Classify(self, request, context):
            start = time.perf_counter()
            # input_fn
            image = Image.open(io.BytesIO(request.image)).convert("RGB")
            x = transform(image).unsqueeze(0)
            decoded = time.perf_counter()
            # predict_fn
            with torch.no_grad():
                logits = model(x)[0]
            done = time.perf_counter()
            probs = torch.softmax(logits, 0)
            k = min(request.top_k or 5, len(labels))
            scores, indices = probs.topk(k)
            response = pb.ClassifyResponse(model_name="baseline", request_id=request.request_id)
            for s, i in zip(scores.tolist(), indices.tolist()):
                response.predictions.add(label=labels[i], index=i, score=s)
            response.timings.decode_us = int((decoded - start) * 1e6)
            response.timings.model_us = int((done - decoded) * 1e6)
            response.timings.total_us = int((time.perf_counter() - start) * 1e6)
            response.timings.batch_size = 1
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_ClassifierServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"baseline listening on 127.0.0.1:{args.port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
