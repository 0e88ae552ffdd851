import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Each test file in its own process: leak checks count this process's fds
    // and threads, and native waiter threads must not be shared between files.
    pool: 'forks',
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
