"""JSON schemas the structured-output tests and tools/bench_constrain.py share: SCHEMAS, each with
an instance valid under it (what a model might write), and TOOLS, ten functions whose parameters
cover nested objects, enums, arrays, numbers and strings. Strings, arrays and numbers are bounded,
so that a random model held to them finishes within a few hundred tokens (an unbounded JSON number
may go on for ever: llguidance's number has no length limit)."""

S = {"type": "string", "maxLength": 24}


def obj(props, required=None, **kw):
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


SCHEMAS = [
    (obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 150}}), {"name": "Ada", "age": 36}),
    (obj({"ok": {"type": "boolean"}}), {"ok": True}),
    (obj({"color": {"enum": ["red", "green", "blue"]}}), {"color": "green"}),
    (obj({"x": {"type": "number", "minimum": -1000, "maximum": 1000},
          "y": {"type": "number", "minimum": -1000, "maximum": 1000}}), {"x": 1.5, "y": -2e2}),
    (obj({"tags": {"type": "array", "items": S, "maxItems": 4}}), {"tags": ["a", "b c"]}),
    (obj({"point": obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
                        "lon": {"type": "number", "minimum": -180, "maximum": 180}})}),
     {"point": {"lat": 48.85, "lon": 2.35}}),
    (obj({"id": {"type": "integer", "minimum": 0, "maximum": 10**6}, "note": {"type": ["string", "null"], "maxLength": 24}}), {"id": 7, "note": None}),
    (obj({"items": {"type": "array", "maxItems": 3,
                    "items": obj({"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 99}})}}),
     {"items": [{"sku": "A-1", "qty": 2}]}),
    ({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 5}, [3, 1, 4]),
    ({"enum": ["yes", "no", "maybe"]}, "maybe"),
    (obj({"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
         required=["title"]), {"title": "Dune", "year": 1965}),
    (obj({"user": obj({"name": S, "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]},
                                             "maxItems": 3}})}),
     {"user": {"name": "lin", "roles": ["dev"]}}),
    (obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}), {"date": "2026-12-07"}),
    (obj({"ratio": {"type": "number", "minimum": 0, "maximum": 1}, "label": {"const": "fixed"}}),
     {"ratio": 0.25, "label": "fixed"}),
    (obj({"shape": {"anyOf": [obj({"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0, "maximum": 10}}),
                              obj({"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 0, "maximum": 10}})]}}),
     {"shape": {"kind": "circle", "r": 2}}),
    (obj({"matrix": {"type": "array", "maxItems": 3,
                     "items": {"type": "array", "items": {"type": "integer", "minimum": -99, "maximum": 99},
                               "maxItems": 3}}}),
     {"matrix": [[1, 2], [3, 4]]}),
    (obj({"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"}}), {"email": "ann@example.org"}),
    (obj({"steps": {"type": "array", "maxItems": 4,
                    "items": obj({"n": {"type": "integer", "minimum": 1, "maximum": 9}, "do": S})}}),
     {"steps": [{"n": 1, "do": "mix"}, {"n": 2, "do": "bake"}]}),
    (obj({"meta": obj({"version": {"type": "integer", "minimum": 1, "maximum": 9},
                       "flags": obj({"beta": {"type": "boolean"}, "public": {"type": "boolean"}})})}),
     {"meta": {"version": 2, "flags": {"beta": False, "public": True}}}),
    (obj({"answer": S, "confidence": {"enum": ["low", "medium", "high"]},
          "sources": {"type": "array", "items": S, "maxItems": 2}}),
     {"answer": "Paris", "confidence": "high", "sources": ["atlas"]}),
]


def tool(name, description, params, required=None):
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": obj(params, required)}}


TOOLS = [
    tool("get_weather", "Current weather in a city.",
         {"city": S, "unit": {"enum": ["celsius", "fahrenheit"]}}, required=["city"]),
    tool("add", "Add two numbers.", {"a": {"type": "number", "minimum": -1e6, "maximum": 1e6},
                                     "b": {"type": "number", "minimum": -1e6, "maximum": 1e6}}),
    tool("search", "Search the web.", {"query": S, "max_results": {"type": "integer", "minimum": 1, "maximum": 10}}),
    tool("create_event", "Put an event in the calendar.",
         {"title": S, "when": obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                   "hour": {"type": "integer", "minimum": 0, "maximum": 23}}),
          "attendees": {"type": "array", "items": S, "maxItems": 3}}),
    tool("set_light", "Switch a light.", {"room": {"enum": ["kitchen", "hall", "bedroom"]}, "on": {"type": "boolean"},
                                          "level": {"type": "number", "minimum": 0, "maximum": 1}}),
    tool("send_email", "Send an email.", {"to": {"type": "array", "items": S, "minItems": 1, "maxItems": 2},
                                          "subject": S, "body": {"type": "string", "maxLength": 40}}),
    tool("order", "Order items.", {"items": {"type": "array", "maxItems": 3, "items": obj(
        {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}})}, "express": {"type": "boolean"}}),
    tool("convert", "Convert a quantity.", {"value": {"type": "number", "minimum": 0, "maximum": 1e4}, "from": {"enum": ["m", "ft", "in"]},
                                            "to": {"enum": ["m", "ft", "in"]}}),
    tool("run_sql", "Run a read-only query.", {"sql": {"type": "string", "maxLength": 40},
                                               "limit": {"type": "integer", "minimum": 1, "maximum": 100}},
         required=["sql"]),
    tool("book_table", "Book a restaurant table.",
         {"restaurant": S, "party": obj({"adults": {"type": "integer", "minimum": 1, "maximum": 8},
                                         "children": {"type": "integer", "minimum": 0, "maximum": 4}}),
          "notes": {"type": ["string", "null"], "maxLength": 24}}),
]
