"""gRPC servicer of serving: proto ⇄ domain mapping around `Generator`, `AdapterRegistry` and
`HeadClassifier`. Thin on purpose: validate → domain call → map; domain errors become gRPC
statuses in the shared interceptor. No torch or vLLM here.
"""

from __future__ import annotations

import asyncio
import time

from google.rpc import code_pb2

from serving_service.adapter_versions import AdapterInfo
from serving_service.classify import HeadClassifier, resolve_head
from serving_service.deployment_sync import DeploymentSync
from serving_service.generation import MAX_BATCH, Chunk, GenerationRequest, Generator
from serving_service.registry import AdapterRegistry
from tunewire import paging
from tunewire.errors import TunewireError, invalid
from tunewire.grpc_util import timestamp
from tunewire.serving.v1 import serving_pb2 as pb
from tunewire.serving.v1 import serving_pb2_grpc

_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
           "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


def request_from_proto(r, context=None) -> GenerationRequest:
    """GenerateRequest and StreamGenerateRequest share their fields."""
    s, f = r.sampling, r.response_format
    fmt = f.WhichOneof("format") or "text"
    remaining = context.time_remaining() if context is not None else None
    return GenerationRequest(
        adapter=r.adapter, prompt=r.prompt, messages=tuple((m.role, m.content) for m in r.messages),
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop), min_tokens=s.min_tokens,
        response_format=fmt,
        json_schema=f.json_schema.schema if fmt == "json_schema" else "",
        strict=fmt == "json_schema" and f.json_schema.strict,
        regex=f.regex.pattern if fmt == "regex" else "",
        choices=tuple(f.choice.choices) if fmt == "choice" else (),
        request_id=r.request_id, time_limit_ms=r.time_limit_ms,
        # the client's gRPC deadline reaches the engine as our deadline
        deadline=time.monotonic() + remaining if remaining is not None else None)


def adapter_to_proto(a: AdapterInfo) -> pb.Adapter:
    return pb.Adapter(
        name=a.name, version=a.version, uri=a.path, rank=a.rank, target_modules=a.target_modules,
        base_model_fingerprint=a.base_model_fingerprint, source_job=a.source_job,
        state=pb.Adapter.State.Value(f"STATE_{a.state}"), load_time=timestamp(a.load_time), load_ms=a.load_ms,
        request_count=a.requests, manifest_sha256=a.manifest_sha256,
        tier=pb.Adapter.Tier.Value(f"TIER_{a.tier}"), pinned=a.pinned, active=a.active,
        size_bytes=a.size_bytes, last_used_time=timestamp(a.last_used), inflight=a.inflight,
        failure_reason=a.failure_reason, failure_message=a.failure_message,
        deployment_generation=a.deployment_generation)


def _fill(out, c: Chunk):
    out.text, out.prompt_tokens, out.completion_tokens = c.text, c.prompt_tokens, c.completion_tokens
    out.adapter, out.adapter_version, out.request_id = c.adapter, c.adapter_version, c.request_id
    out.warnings.extend(c.warnings)
    if c.finish_reason is not None:
        out.finish_reason = _FINISH[c.finish_reason]
        out.timings.CopyFrom(pb.Timings(**c.timings))
        out.structured_output_valid = c.structured_output_valid
        out.structured_output_error = c.structured_output_error
    return out


class ServingServicer(serving_pb2_grpc.ServingServiceServicer):
    def __init__(self, generator: Generator, registry: AdapterRegistry, classifier: HeadClassifier,
                 model_info: dict, sync: DeploymentSync):
        self.generator, self.registry = generator, registry
        self.classifier, self.model_info = classifier, model_info
        self.sync = sync  # the fleet's deployment record: LoadAdapter and PinAdapter write it

    async def Generate(self, request, context):
        return _fill(pb.GenerateResponse(), await self.generator.complete(request_from_proto(request, context)))

    async def BatchGenerate(self, request, context):
        if not 1 <= len(request.requests) <= MAX_BATCH:
            raise invalid("requests", f"1 to {MAX_BATCH} requests")

        async def one(r) -> pb.BatchGenerateResult:
            try:
                c = await self.generator.complete(request_from_proto(r, context))
            except TunewireError as e:  # one bad request does not fail the others
                return pb.BatchGenerateResult(error=pb.BatchGenerateError(
                    code=getattr(code_pb2, e.code), reason=e.reason, message=e.message))
            return pb.BatchGenerateResult(response=_fill(pb.GenerateResponse(), c))

        # Concurrently: the engine batches them (mixing adapters) like separate calls.
        return pb.BatchGenerateResponse(results=await asyncio.gather(*(one(r) for r in request.requests)))

    async def StreamGenerate(self, request, context):
        async for c in self.generator.stream(request_from_proto(request, context)):
            yield _fill(pb.StreamGenerateResponse(), c)

    async def Classify(self, request, context):
        path, manifest = await asyncio.to_thread(resolve_head, self.registry.checks, request.head)
        results = await self.classifier.classify(path, list(request.texts))
        return pb.ClassifyResponse(head=manifest.name, head_version=manifest.version, results=[
            pb.Classification(label=label, scores=[pb.LabelScore(label=l, probability=p) for l, p in scores])
            for label, scores in results])

    async def LoadAdapter(self, request, context):
        load = dict(uri=request.uri, version=request.version, manifest_sha256=request.manifest_sha256,
                    pin=request.pin)
        if request.stage:  # this replica only: validated and resident, the deployment unchanged
            a, generation = await self.registry.load(request.name, flip=False, **load), 0
        else:  # the whole fleet: recorded in the store, every replica follows
            a, generation = await self.sync.deploy(request.name, **load)
        return pb.LoadAdapterResponse(adapter=adapter_to_proto(self.registry.info(a)),
                                      deployment_generation=generation)

    async def UnloadAdapter(self, request, context):
        await self.registry.unload(request.name)
        return pb.UnloadAdapterResponse()

    async def PinAdapter(self, request, context):
        a = await self.sync.pin(request.name, request.pinned)
        return pb.PinAdapterResponse(adapter=adapter_to_proto(self.registry.info(a)))

    async def ListAdapters(self, request, context):
        adapters = self.registry.list(include_store=request.include_store)
        page, nxt = paging.page(adapters, request.page_size, request.page_token,
                                f"adapters/{int(request.include_store)}")
        return pb.ListAdaptersResponse(adapters=[adapter_to_proto(a) for a in page], next_page_token=nxt,
                                       deployment_generation=self.registry.deployment_generation)

    async def WatchAdapters(self, request, context):
        # Headers go out once the watch is subscribed: a client that waits for them (the
        # call's initial metadata) cannot miss a change it causes afterwards.
        async for info, initial in self.registry.watch(request.name,
                                                       lambda: context.send_initial_metadata(())):
            yield pb.WatchAdaptersResponse(adapter=adapter_to_proto(info), initial=initial,
                                           time=timestamp(time.time()))

    async def Tokenize(self, request, context):
        tokens = self.generator.tokenize(request.adapter, request.text)
        return pb.TokenizeResponse(token_count=len(tokens), tokens=[
            pb.Token(id=i, text=t, start=a, end=b) for i, t, a, b in tokens])

    async def GetModelInfo(self, request, context):
        return pb.GetModelInfoResponse(**self.model_info,
                                       deployment_generation=self.registry.deployment_generation)
