"""gRPC servicer of serving: proto ⇄ domain mapping around `Generator` and `AdapterRegistry`.

No torch or vLLM here; domain errors become gRPC statuses in the shared interceptor.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from serving_service.generation import Chunk, GenerationRequest, Generator
from serving_service.registry import AdapterRegistry, LoadedAdapter
from tunewire.serving.v1 import serving_pb2 as pb
from tunewire.serving.v1 import serving_pb2_grpc

_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
           "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


def request_from_proto(r) -> GenerationRequest:
    """GenerateRequest and StreamGenerateRequest share their fields."""
    s = r.sampling
    fmt = r.response_format.WhichOneof("format") or "text"
    return GenerationRequest(
        adapter=r.adapter, prompt=r.prompt, messages=tuple((m.role, m.content) for m in r.messages),
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop), response_format=fmt,
        json_schema=r.response_format.json_schema.schema if fmt == "json_schema" else "",
        request_id=r.request_id)


def adapter_to_proto(a: LoadedAdapter) -> pb.Adapter:
    ts = Timestamp()
    ts.FromNanoseconds(int(a.load_time * 1e9))
    return pb.Adapter(name=a.name, version=a.version, uri=str(a.path), rank=a.manifest.rank,
                      target_modules=a.manifest.target_modules,
                      base_model_fingerprint=a.manifest.base_model_fingerprint,
                      source_job=a.manifest.source_job, state=pb.Adapter.State.Value(f"STATE_{a.state}"),
                      load_time=ts, load_ms=a.load_ms, request_count=a.requests,
                      manifest_sha256=a.manifest.sha256)


def _fill(out, c: Chunk):
    out.text, out.prompt_tokens, out.completion_tokens = c.text, c.prompt_tokens, c.completion_tokens
    out.adapter, out.adapter_version, out.request_id = c.adapter, c.adapter_version, c.request_id
    if c.finish_reason is not None:
        out.finish_reason = _FINISH[c.finish_reason]
        out.timings.CopyFrom(pb.Timings(**c.timings))
        out.structured_output_valid = c.structured_output_valid
        out.structured_output_error = c.structured_output_error
    return out


class ServingServicer(serving_pb2_grpc.ServingServiceServicer):
    def __init__(self, generator: Generator, registry: AdapterRegistry, model_info: dict):
        self.generator, self.registry, self.model_info = generator, registry, model_info

    async def Generate(self, request, context):
        parts, last = [], None
        async for c in self.generator.stream(request_from_proto(request)):
            parts.append(c.text)
            last = c
        last.text = "".join(parts)
        return _fill(pb.GenerateResponse(), last)

    async def StreamGenerate(self, request, context):
        async for c in self.generator.stream(request_from_proto(request)):
            yield _fill(pb.StreamGenerateResponse(), c)

    async def LoadAdapter(self, request, context):
        a = await self.registry.load(request.name, uri=request.uri, version=request.version,
                                     manifest_sha256=request.manifest_sha256)
        return pb.LoadAdapterResponse(adapter=adapter_to_proto(a))

    async def UnloadAdapter(self, request, context):
        await self.registry.unload(request.name)
        return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        adapters = self.registry.list()
        start = int(request.page_token or 0) if (request.page_token or "0").isdigit() else 0
        size = request.page_size or 100
        page = adapters[start:start + size]
        nxt = str(start + size) if start + size < len(adapters) else ""
        return pb.ListAdaptersResponse(adapters=[adapter_to_proto(a) for a in page], next_page_token=nxt)

    async def Tokenize(self, request, context):
        tokens = self.generator.tokenize(request.adapter, request.text)
        return pb.TokenizeResponse(token_count=len(tokens), tokens=[
            pb.Token(id=i, text=t, start=a, end=b) for i, t, a, b in tokens])

    async def GetModelInfo(self, request, context):
        return pb.GetModelInfoResponse(**self.model_info)
