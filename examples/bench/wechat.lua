-- wrk script: signed 公众号 plaintext text messages, each with a unique MsgId, from 1000 users.
-- The query (signature over a fixed timestamp) comes from run.sh; the bench config sets
-- replay_window_secs = 0 so the fixed timestamp stays valid.
local thread_counter = 0

function setup(thread)
  thread_counter = thread_counter + 1
  thread:set("thread_id", thread_counter)
end

function init(args)
  counter = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "text/xml"
end

function request()
  counter = counter + 1
  local msg_id = thread_id * 1000000000 + counter
  local user = "oBench" .. (msg_id % 1000)
  local body = "<xml><ToUserName><![CDATA[gh_bench]]></ToUserName><FromUserName><![CDATA[" .. user ..
    "]]></FromUserName><CreateTime>1700000000</CreateTime><MsgType><![CDATA[text]]></MsgType>" ..
    "<Content><![CDATA[你好，请介绍一下你自己]]></Content><MsgId>" .. msg_id .. "</MsgId></xml>"
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  io.write(string.format("RESULT requests_per_sec=%.0f p50_ms=%.2f p99_ms=%.2f errors=%d non2xx=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
