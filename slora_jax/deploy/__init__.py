"""Running many engines behind one endpoint (``slora-jax serve --replicas N``; needs the ``ray`` extra).

    from slora_jax.deploy.ray import build_app
    serve.run(build_app(args, replicas=2))

``asgi`` and ``fleet`` import nothing from Ray: the in-process HTTP calls a replica makes into its own app,
and the cluster-wide adapter catalog, metrics and model lists that the replicas share.
"""

import os

RAY_EXTRA = "pip install 'slora-jax[ray]'"
INGRESS_MODES = ("direct", "proxy")


def add_replica_args(group) -> None:
    """``slora-jax serve`` flags of the Ray Serve deployment (imports nothing from Ray)."""
    group.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="run N engines behind this address on Ray Serve, requests routed by adapter "
                            "(default: one engine in this process, no Ray)")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="Ray cluster to join ('auto': the one `ray start --head` started here; host:port of "
                            "a head node); default: $RAY_ADDRESS if set, else start a local one")
    group.add_argument("--ray-ingress", choices=INGRESS_MODES, default=None,
                       help="how requests reach the app: 'proxy' (default) puts Serve's HTTP proxy on --port; "
                            "'direct' runs Ray Serve throughput-optimized, the ingress replica answering on --port "
                            "itself (Serve's proxy moves to another free port): one hop less, about 6 ms less per "
                            "request on 2 x H200, but an ingress replica that dies can leave --port closed until "
                            "the command restarts. Only with a Ray instance this command starts: a cluster joined "
                            "(--ray-address or $RAY_ADDRESS) keeps the mode its processes started with")
    group.add_argument("--min-replicas", type=int, default=None, metavar="N",
                       help="with --max-replicas: scale down to N replicas when idle (default: 1)")
    group.add_argument("--max-replicas", type=int, default=None, metavar="N",
                       help="autoscale up to N replicas (Ray Serve's autoscaling_config) instead of a fixed count")
    group.add_argument("--target-ongoing-requests", type=float, default=64.0, metavar="N",
                       help="with --max-replicas: requests in flight per replica that the autoscaler aims at")
    group.add_argument("--replica-gpus", type=float, default=None, metavar="N",
                       help="GPUs each replica takes (default: --tensor-parallel on a cluster with GPUs, else 0)")
    group.add_argument("--replica-cpus", type=float, default=1.0, metavar="N", help="CPUs each replica takes")
    group.add_argument("--max-ongoing-requests", type=int, default=256, metavar="N",
                       help="requests one replica takes at once before Serve routes elsewhere")


def wants_ray(args) -> bool:
    """Whether ``serve`` args ask for replicas on Ray: more than one, autoscaling, or a cluster to join."""
    return bool((args.replicas or 1) > 1 or args.max_replicas is not None or args.ray_address)


def joins_cluster(args) -> bool:
    """Whether ``serve`` joins a running Ray cluster rather than starting its own (Ray's own ray.init reads
    $RAY_ADDRESS; ``ray job submit`` sets it for its entrypoint)."""
    return bool(args.ray_address or os.environ.get("RAY_ADDRESS"))


def ingress_mode(args) -> str:
    """``direct`` or ``proxy`` (see ``--ray-ingress``). Direct ingress is switched on by environment variables
    that Serve's processes read when they start: only a Ray instance this command starts can have them."""
    from slora_jax.server.startup import StartupError

    choice = getattr(args, "ray_ingress", None)
    if not joins_cluster(args):
        return choice or "proxy"
    if choice == "direct":
        raise StartupError("--ray-ingress direct needs a Ray instance started by this command: a running cluster "
                           "(--ray-address or $RAY_ADDRESS) keeps the Serve settings it started with; leave "
                           "--ray-ingress out (proxy) there")
    return "proxy"


def run_replicas(args) -> int:
    """``slora-jax serve --replicas N``; without Ray installed, one line saying which extra to install."""
    from slora_jax.server.startup import StartupError

    if args.replicas is not None and args.replicas < 1:
        raise StartupError(f"--replicas must be at least 1, got {args.replicas}")
    try:
        from slora_jax.deploy import ray as ray_deploy
    except ImportError as e:
        flag = f"--replicas {args.replicas}" if args.replicas else "--max-replicas/--ray-address"
        raise StartupError(f"{flag} runs the engines on Ray Serve, which is not installed here ({e.name or e}): "
                           f"{RAY_EXTRA}")
    return ray_deploy.run(args)
