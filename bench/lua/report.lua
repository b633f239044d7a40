-- Appended to every script: one machine-readable line with the figures we report.
done = function(summary, latency, requests)
  local non2xx = summary.errors.status
  local socket = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT requests=%d duration_us=%d non2xx=%d socket_errors=%d p50_us=%d p99_us=%d p999_us=%d\n",
    summary.requests, summary.duration, non2xx, socket,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
