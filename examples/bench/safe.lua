-- wrk script: replays pre-encrypted safe-mode requests written by `bench_safe_bodies`
-- (one `<query>\t<body>` per line). Each wrk thread takes every other line, so no two requests
-- share a MsgId; a thread that runs out starts over (those repeats are cheap duplicates, and
-- run.sh makes the file large enough that they do not happen at the measured rates).
local thread_counter = 0

function setup(thread)
  thread_counter = thread_counter + 1
  thread:set("thread_id", thread_counter)
end

function init(args)
  -- Each request is formatted here, once: formatting in request() leaves garbage behind every
  -- call, and LuaJIT's collector then walks the whole table of bodies (hundreds of MB), which
  -- stalls the wrk thread for tens of milliseconds and shows up as server latency at p99.
  requests = {}
  local base = args[2]
  local index = 0
  for line in io.lines(args[1]) do
    index = index + 1
    if index % 2 == thread_id - 1 then
      local tab = line:find("\t", 1, true)
      requests[#requests + 1] = wrk.format("POST", base .. "?" .. line:sub(1, tab - 1),
        { ["Content-Type"] = "text/xml" }, line:sub(tab + 1))
    end
  end
  counter = 0
end

function request()
  counter = counter % #requests + 1
  return requests[counter]
end

function done(summary, latency, requests)
  io.write(string.format("RESULT requests_per_sec=%.0f p50_ms=%.2f p99_ms=%.2f errors=%d non2xx=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
