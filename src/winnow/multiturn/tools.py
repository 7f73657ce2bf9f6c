"""The ``tools`` scheduler: runs the model's tool calls against Python functions, and their results go back
as ``tool`` messages.

Tools are registered by name (``winnow list tools``): the built-ins ``python`` (the model's program run
in winnow's sandbox, :mod:`winnow.rewards.sandbox`: a fresh interpreter per call, no network where the
machine allows it) and ``calculator``, and any function a plugin file registers::

    from winnow.registry import tool

    @tool
    def lookup(word: str) -> str:
        \"\"\"The definition of a word.\"\"\"
        ...

A function's OpenAI tool definition comes from its signature and docstring (or its ``spec`` attribute);
the row's own ``tools`` are offered too. A call is found in the reply three ways: the API's ``tool_calls``
(the client engine), ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks in the text
(Qwen/Hermes models on local engines), and, with the ``python`` tool, a reply that ends with a fenced
Python block: the program runs and its output is written into the answer as a ```` ```output ```` block
that the model continues (tool-integrated reasoning), the engine stopping at ```` ```output ```` so the
model does not write the output itself. A reply without a call ends the trajectory.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import operator
import re
import typing
from collections.abc import Callable
from typing import Any

from winnow.errors import ConfigError
from winnow.multiturn import Trajectory, TurnResult
from winnow.schema import FINISH_LENGTH, Message

CODE_OUTPUT_STOP = "```output"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)
_CODE_START = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n")
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
_ARG_DOC = re.compile(r"^\s+(\w+)\s*(?:\([^)]*\))?:\s*(.+)$")


# ----------------------------------------------------------------------------- tool definitions


def function_spec(name: str, fn: Any) -> dict[str, Any]:
    """The OpenAI tool definition of a function: its name, its docstring's first paragraph, its parameters
    (types from the annotations, descriptions from an ``Args:`` section, required when they have no default)."""
    own = getattr(fn, "spec", None)
    if isinstance(own, dict):
        return own
    target = fn.__call__ if not inspect.isfunction(fn) and not inspect.ismethod(fn) else fn  # noqa: B004
    doc = inspect.getdoc(fn) or inspect.getdoc(target) or ""
    described = {m.group(1): m.group(2).strip() for m in map(_ARG_DOC.match, doc.splitlines()) if m}
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = {}
    properties: dict[str, Any] = {}
    required = []
    for p in inspect.signature(target).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind = hints.get(p.name, str)
        prop: dict[str, Any] = {"type": _JSON_TYPES.get(getattr(kind, "__origin__", kind), "string")}
        if p.name in described:
            prop["description"] = described[p.name]
        properties[p.name] = prop
        if p.default is p.empty:
            required.append(p.name)
    summary = doc.split("\n\n")[0].replace("\n", " ").strip()
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": summary,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def build_tool(name: str, options: dict[str, Any]) -> Any:
    """The registered tool called ``name``: a function as it is, a class built with the options it takes."""
    from winnow import registry

    target = registry.REGISTRY.resolve(
        "tool", name, "Register one with @winnow.registry.tool in a file given to --external_plugins."
    )
    if inspect.isclass(target):
        accepted = inspect.signature(target.__init__).parameters
        return target(**{k: v for k, v in options.items() if k in accepted})
    if not callable(target):
        raise ConfigError(f"tool {name}: {target!r} is not callable")
    return target


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more characters cut)"


# ----------------------------------------------------------------------------- finding calls in a reply


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks of a reply: the text without them and
    the calls in OpenAI's shape (blocks that are not such JSON are left in the text)."""
    calls, kept, at = [], [], 0
    for match in _TOOL_CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue
        arguments = body.get("arguments", body.get("parameters", {}))
        kept.append(text[at : match.start()])
        at = match.end()
        calls.append(
            {
                "type": "function",
                "function": {
                    "name": body["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
                },
            }
        )
    kept.append(text[at:])
    return "".join(kept).strip(), calls


def trailing_code(text: str) -> str | None:
    """The program of a reply that ends with a closed fenced Python block (nothing but space after it)."""
    body = text.rstrip()
    if not body.endswith("```"):
        return None
    starts = list(_CODE_START.finditer(body[:-3]))
    if not starts:
        return None
    code = body[starts[-1].end() : -3]
    return None if "```" in code else code


# ----------------------------------------------------------------------------- built-in tools

_OPS: dict[type[ast.AST], Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.

    Args:
        expression: the expression, e.g. (17 + 25) * 2
    """

    def value(node: ast.AST) -> float | int:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10**6):
                raise ValueError("the power is too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    try:
        result = value(ast.parse(expression.strip(), mode="eval").body)
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, TypeError, OverflowError) as e:
        return f"error: {e}"
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(result)


async def calculator_tool(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.

    Args:
        expression: the expression, e.g. (17 + 25) * 2
    """
    return calculator(expression)  # microseconds: on the event loop, not a thread


class PythonTool:
    """Run a Python program and return what it prints (a fresh interpreter each call, in winnow's sandbox).

    Args:
        code: the program; print what you want to see
    """

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 1024, workers: int | None = None):
        from winnow.rewards.sandbox import Limits, Sandbox

        self.sandbox = Sandbox(Limits(timeout_s=timeout_s, memory_mb=memory_mb), workers=workers)

    def describe(self) -> dict[str, Any]:
        return self.sandbox.describe()

    async def __call__(self, code: str) -> str:
        result = await self.sandbox.arun(code)
        if result.error is not None:
            return f"error: the sandbox failed: {result.error}"
        out = result.stdout
        if result.timed_out or result.limit:
            out += f"\n(stopped: {result.limit or 'timeout'} limit reached)"
        elif result.exit_code != 0:
            tail = result.stderr.strip().splitlines()[-8:]
            out += ("\n" if out and not out.endswith("\n") else "") + "\n".join(tail)
        return out.rstrip("\n") if out.strip() else "(no output)"

    async def aclose(self) -> None:
        await asyncio.to_thread(self.sandbox.close)


# ----------------------------------------------------------------------------- the scheduler


class ToolScheduler:
    """Runs the model's tool calls (the API's tool_calls, <tool_call> blocks, trailing Python blocks) and
    sends the results back; a reply without a call ends the trajectory."""

    def __init__(
        self,
        tools: list[str] | None = None,
        *,
        timeout_s: float = 30.0,
        max_result_chars: int = 4000,
        code_blocks: bool | None = None,
        memory_mb: int = 1024,
    ):
        self.timeout_s = float(timeout_s)
        self.max_result_chars = int(max_result_chars)
        names = list(dict.fromkeys(tools or []))
        self.tools = {
            name: build_tool(name, {"timeout_s": min(self.timeout_s, 60.0), "memory_mb": memory_mb}) for name in names
        }
        self.specs = [function_spec(name, fn) for name, fn in self.tools.items()]
        self.code_blocks = ("python" in self.tools) if code_blocks is None else bool(code_blocks)
        if self.code_blocks and "python" not in self.tools:
            raise ConfigError(
                "multi_turn_kwargs code_blocks: running code blocks needs the python tool (--tools python)"
            )
        self.stop_words = [CODE_OUTPUT_STOP] if self.code_blocks else []

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tools": list(self.tools),
            "timeout_s": self.timeout_s,
            "max_result_chars": self.max_result_chars,
            "code_blocks": self.code_blocks,
        }
        if isinstance(self.tools.get("python"), PythonTool):
            out["sandbox"] = self.tools["python"].describe()
        return out

    async def start(self, trajectory: Trajectory) -> None:
        """Offer the row's tools and the registered ones (a row's definition wins for a name it has)."""
        own = list(trajectory.tools or [])
        named = {(t.get("function") or {}).get("name") for t in own}
        offered = own + [spec for spec in self.specs if spec["function"]["name"] not in named]
        trajectory.tools = offered or None

    async def step(self, trajectory: Trajectory) -> TurnResult:
        reply = trajectory.reply
        if reply.finish_reason == FINISH_LENGTH:  # a call cut in the middle cannot be trusted
            return TurnResult(done=True)
        last = trajectory.messages[-1]
        calls = list(last.get("tool_calls") or [])
        if not calls and isinstance(last.get("content"), str) and "<tool_call>" in last["content"]:
            text, calls = parse_tool_calls(last["content"])
            for k, call in enumerate(calls):
                call["id"] = f"call_{trajectory.turn}_{k}"
            if calls:  # the standard shape: the calls structured, the text without them
                last["content"], last["tool_calls"] = text or None, calls
        if calls:
            if trajectory.last_turn:  # nothing would read the results
                return TurnResult(info={"not_run": [_name(c) for c in calls]})
            offered = {(t.get("function") or {}).get("name") for t in trajectory.tools or []}
            results = await asyncio.gather(*(self.call(c, offered) for c in calls))
            messages: list[Message] = []
            for k, (call, result) in enumerate(zip(calls, results, strict=True)):
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call.get("id") or f"call_{trajectory.turn}_{k}",
                        "name": _name(call),
                        "content": result,
                    }
                )
            return TurnResult(messages=messages, info={"tool_calls": [_name(c) for c in calls]})
        code = trailing_code(last.get("content") or "") if self.code_blocks else None
        if code is None:
            return TurnResult(done=True)
        if trajectory.last_turn:
            return TurnResult(info={"not_run": ["python"]})
        output = await self._run("python", {"code": code})
        last["content"] = last["content"].rstrip() + f"\n{CODE_OUTPUT_STOP}\n{output}\n```\n"  # the model continues
        return TurnResult(info={"tool_calls": ["python"], "code_block": True})

    async def call(self, call: dict[str, Any], offered: set[str | None] | None = None) -> str:
        """One tool call's result as text; whatever goes wrong is the result ("error: ..."), for the model to read.
        A tool the row offers (``offered``) runs when a function of that name is registered, even without --tools."""
        name = _name(call)
        raw = (call.get("function") or {}).get("arguments") or "{}"
        try:
            arguments = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as e:
            return f"error: the arguments of {name} are not valid JSON ({e.msg})"
        if not isinstance(arguments, dict):
            return f"error: the arguments of {name} must be a JSON object"
        if name not in self.tools and name in (offered or ()):
            self._add_registered(name)
        return await self._run(name, arguments)

    async def _run(self, name: str, arguments: dict[str, Any]) -> str:
        fn = self.tools.get(name)
        if fn is None:
            return f"error: no tool named {name!r}; the tools are {', '.join(self.tools) or 'none'}"
        try:
            out = fn(**arguments) if _is_async(fn) else asyncio.to_thread(fn, **arguments)
            result = await asyncio.wait_for(out, self.timeout_s)
        except asyncio.TimeoutError:
            return f"error: {name} did not answer within {self.timeout_s:g}s"
        except TypeError as e:
            return f"error: bad arguments for {name}: {e}"
        except Exception as e:
            return f"error: {type(e).__name__}: {e}"
        return _text(result, self.max_result_chars)

    def _add_registered(self, name: str) -> None:
        """The registered tool of a name a row offers (once), if there is one."""
        from winnow import registry

        if registry.REGISTRY.get("tool", name) is not None:
            self.tools[name] = build_tool(name, {"timeout_s": min(self.timeout_s, 60.0)})

    async def aclose(self) -> None:
        for fn in self.tools.values():
            if isinstance(fn, PythonTool):
                await fn.aclose()


def _name(call: dict[str, Any]) -> str:
    return str((call.get("function") or {}).get("name") or "")


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004
