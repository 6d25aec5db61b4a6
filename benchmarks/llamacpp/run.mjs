// llama.cpp (node-llama-cpp's prebuilt CPU binary) on a GGUF: greedy, N new tokens, 2 threads.
// Usage: node run.mjs MODEL.gguf "prompt" MAX_TOKENS [THREADS]
// Prints one JSON line: load seconds, time to first token, decode tokens/s (first token excluded),
// and the generated token count. Run by benchmarks/speed.py; install with `npm ci` here
// (package.json pins node-llama-cpp 3.21.1, whose install brings a prebuilt binary: no compiler).
import { readFileSync } from "node:fs";
import { getLlama, LlamaCompletion } from "node-llama-cpp";

// Peak RSS of this process (VmHWM resets at exec; getrusage's maxrss is inherited from the parent).
function peakRssMib() {
  const m = readFileSync("/proc/self/status", "utf8").match(/VmHWM:\s+(\d+) kB/);
  return m ? Number(m[1]) / 1024 : null;
}

const [modelPath, prompt, maxTokensArg, threadsArg] = process.argv.slice(2);
const maxTokens = Number(maxTokensArg ?? 128);
const threads = Number(threadsArg ?? 2);
const t0 = performance.now();
const llama = await getLlama({ gpu: false, build: "never" });
const model = await llama.loadModel({ modelPath });
const context = await model.createContext({ contextSize: 1024, threads });
const completion = new LlamaCompletion({ contextSequence: context.getSequence() });
const tLoaded = performance.now();
let first = null;
let last = null;
let count = 0;
const text = await completion.generateCompletion(prompt, {
  maxTokens,
  temperature: 0,
  onToken(tokens) {
    const now = performance.now();
    count += tokens.length;
    if (first === null) first = now;
    last = now;
  },
});
const decodeTokens = count - 1;
console.log(JSON.stringify({
  engine: "llama.cpp",
  load_s: (tLoaded - t0) / 1000,
  ttft_s: (first - tLoaded) / 1000,
  first_token_unix: (performance.timeOrigin + first) / 1000,
  tokens: count,
  tok_s: decodeTokens > 0 ? decodeTokens / ((last - first) / 1000) : null,
  peak_rss_mib: peakRssMib(),
  text,
}));
await context.dispose();
await model.dispose();
await llama.dispose();
