"""`tunewire adapters|generate|classify|model ...`: serving's client commands.

    tunewire adapters list [--all] | load NAME [--version v2 | --uri NAME/v2] [--pin]
    tunewire adapters unload|pin|unpin NAME[@VERSION] | watch [NAME]
    tunewire generate --prompt TEXT [--adapter A[@vN]] [--json-schema FILE | --json-object |
                      --regex R | --choice a,b] [--stream]
    tunewire classify HEAD TEXT...
    tunewire model info | tokenize TEXT [--adapter A]
"""

from __future__ import annotations

from tunewire.cli.client import print_message, rpc_errors, serving_stub


@rpc_errors
def cmd_adapters(args) -> int:
    from tunewire.serving.v1 import serving_pb2 as pb

    stub = serving_stub(args)
    state = lambda a: pb.Adapter.State.Name(a.state)[6:].lower()  # noqa: E731
    if args.action == "list":
        for a in stub.ListAdapters(pb.ListAdaptersRequest(include_store=args.all)).adapters:
            flags = "".join([" active" if a.active else "", " pinned" if a.pinned else ""])
            print(f"{a.name}@{a.version}  {state(a)}{flags}  rank {a.rank}  {','.join(a.target_modules)}  "
                  f"requests {a.request_count}  load {a.load_ms:.0f} ms  {a.uri}")
    elif args.action == "load":
        print_message(stub.LoadAdapter(pb.LoadAdapterRequest(name=args.name, version=args.version,
                                                             uri=args.uri, pin=args.pin)).adapter)
    elif args.action in ("pin", "unpin"):
        print_message(stub.PinAdapter(pb.PinAdapterRequest(name=args.name, pinned=args.action == "pin")).adapter)
    elif args.action == "watch":
        for ev in stub.WatchAdapters(pb.WatchAdaptersRequest(name=args.name)):
            a = ev.adapter
            print(f"{a.name}@{a.version}  {state(a)}{'  active' if a.active else ''}  {a.failure_reason}",
                  flush=True)
    else:
        stub.UnloadAdapter(pb.UnloadAdapterRequest(name=args.name))
        print(f"unloaded {args.name}")
    return 0


@rpc_errors
def cmd_classify(args) -> int:
    from tunewire.serving.v1 import serving_pb2 as pb

    r = serving_stub(args).Classify(pb.ClassifyRequest(head=args.head, texts=args.texts))
    for text, c in zip(args.texts, r.results):
        best = max(s.probability for s in c.scores)
        print(f"{c.label}\t{best:.3f}\t{text}")
    return 0


@rpc_errors
def cmd_generate(args) -> int:
    from tunewire.serving.v1 import serving_pb2 as pb

    fmt = pb.ResponseFormat(text=pb.TextFormat())
    if args.json_schema:
        with open(args.json_schema) as f:
            fmt = pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(schema=f.read(), strict=args.strict))
    elif args.json_object:
        fmt = pb.ResponseFormat(json_object=pb.JsonObjectFormat())
    elif args.regex:
        fmt = pb.ResponseFormat(regex=pb.RegexFormat(pattern=args.regex))
    elif args.choice:
        fmt = pb.ResponseFormat(choice=pb.ChoiceFormat(choices=args.choice.split(",")))
    sampling = pb.SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                                 temperature=args.temperature)
    common = dict(adapter=args.adapter, prompt=args.prompt, sampling=sampling, response_format=fmt,
                  time_limit_ms=args.time_limit_ms)
    stub = serving_stub(args)
    if args.stream:
        for r in stub.StreamGenerate(pb.StreamGenerateRequest(**common)):
            print(r.text, end="", flush=True)
        print()
        return 0
    print_message(stub.Generate(pb.GenerateRequest(**common)))
    return 0


@rpc_errors
def cmd_model(args) -> int:
    from tunewire.serving.v1 import serving_pb2 as pb

    stub = serving_stub(args)
    if args.action == "info":
        print_message(stub.GetModelInfo(pb.GetModelInfoRequest()))
        return 0
    r = stub.Tokenize(pb.TokenizeRequest(adapter=args.adapter, text=args.text))
    for t in r.tokens:
        print(f"{t.id:>7}  [{t.start}:{t.end}]  {t.text!r}")
    print(f"{r.token_count} tokens")
    return 0


def add_parser(sub) -> None:
    a = sub.add_parser("adapters", help="adapters in serving")
    as_ = a.add_subparsers(dest="action", required=True)
    as_.add_parser("list").add_argument("--all", action="store_true", help="also versions only in the store")
    ld = as_.add_parser("load", help="load a version from the store and make it the active one")
    ld.add_argument("name")
    ld.add_argument("--uri", default="", help="store directory (default: name/version in the store)")
    ld.add_argument("--version", default="", help="default: the newest in the store")
    ld.add_argument("--pin", action="store_true")
    for action in ("unload", "pin", "unpin"):
        as_.add_parser(action).add_argument("name", help="name or name@version")
    as_.add_parser("watch", help="state changes as they happen").add_argument("name", nargs="?", default="")
    a.set_defaults(func=cmd_adapters)

    cl = sub.add_parser("classify", help="classify texts with a feature-extraction head")
    cl.add_argument("head", help="name or name@version of a published head")
    cl.add_argument("texts", nargs="+")
    cl.set_defaults(func=cmd_classify)

    g = sub.add_parser("generate", help="generate with the base model or an adapter")
    g.add_argument("--prompt", required=True)
    g.add_argument("--adapter", default="", help="name or name@version (default: the base model)")
    g.add_argument("--json-schema", help="local file with a JSON schema to constrain the output")
    g.add_argument("--json-object", action="store_true")
    g.add_argument("--strict", action="store_true", help="with --json-schema: refuse unenforceable keywords")
    g.add_argument("--regex", default="", help="constrain the output to this regular expression")
    g.add_argument("--choice", default="", help="comma-separated strings; the output is one of them")
    g.add_argument("--time-limit-ms", type=int, default=0)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--min-tokens", type=int, default=0, help="no end-of-sequence or stop before this")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--stream", action="store_true")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("model", help="the served model: info, tokenize")
    ms = m.add_subparsers(dest="action", required=True)
    ms.add_parser("info")
    tk = ms.add_parser("tokenize")
    tk.add_argument("text")
    tk.add_argument("--adapter", default="")
    m.set_defaults(func=cmd_model)
