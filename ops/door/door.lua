-- KOA-Serve's front door (ops/door/config.py): what the audit line says about TorchServe's answer.
-- Converters on the answer's bytes (REST JSON, or gRPC's framed protobuf whose payload is the same JSON):
-- Lua strings are bytes, so a gRPC frame's binary header does not get in the way. Only the grade and the
-- refusal type are read; nothing else of the answer leaves this function.

-- The first knee's KL grade ("kl_grade": 0-4), or "" when the answer has none.
core.register_converters("koa_grade", function(body)
    return string.match(body, '"kl_grade"%s*:%s*(%d)') or ""
end)

-- The refusal type of an error answer: TorchServe's {"code", "type"} or the handler's {"error": {"type"}}.
core.register_converters("koa_refusal", function(body)
    return string.match(body, '"type"%s*:%s*"([%w_]+)"') or ""
end)
