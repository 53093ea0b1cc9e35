// A subscriber with the plain, unmodified socket.io-client: the README's
// recovery recipe as a file, nothing herald-specific. It keeps the last offset
// of each room and re-subscribes with `since` in its `connect` handler. After
// a cut (the network, a restart, or herald closing the transport of a slow
// consumer or an expired token) socket.io-client reconnects by itself, and
// herald replays what was missed (`recovered: true`) or says to refetch
// (`recovered: false`).
//
//   HERALD_URL=http://localhost:3000 HERALD_TOKEN=<client token> node subscriber.mjs [campaign:demo-campaign …]
//
// Rooms are `kind:id`, broadest first. It runs until herald ends the session
// for good (a user-level revocation) or you stop it.

import { io } from "socket.io-client";

const EVENT_TYPES = ["entity_updated", "state_invalidated", "world_time_changed", "settlement_updated", "structure_updated"];
const url = process.env.HERALD_URL ?? "http://localhost:3000";
let rooms = (process.argv.length > 2 ? process.argv.slice(2) : ["campaign:demo-campaign"]).map((r) => r.split(":"));

// A token function is called again on every reconnect: fetch a fresh one there.
const socket = io(url, { auth: (cb) => cb({ token: process.env.HERALD_TOKEN }) });

/** Whether `event` is delivered to room `kind:id` (the README's delivery table). */
function targets(event, kind, id) {
  const p = event.payload;
  if (kind === "campaign") return p.campaignId === id;
  const ownEntity = event.type === "entity_updated" && p.entityType === kind && p.entityId === id;
  return p[`${kind}Id`] === id || ownEntity;
}

const last = new Map(); // room -> last offset seen
for (const type of EVENT_TYPES) {
  socket.on(type, (event) => {
    for (const [kind, id] of rooms) if (targets(event, kind, id)) last.set(`${kind}:${id}`, event.offset);
    console.log(`event ${type} ${event.offset} ${JSON.stringify(event.payload)}`); // your apply(event)
  });
}

socket.on("connect", async () => {
  console.log("connected");
  for (const [kind, id] of rooms) {
    const since = last.get(`${kind}:${id}`);
    try {
      const ack = await socket.timeout(10_000).emitWithAck(`subscribe_${kind}`, { [`${kind}Id`]: id, ...(since && { since }) });
      console.log(`subscribed ${kind}:${id} since=${since ?? "-"} ${JSON.stringify(ack)}`);
      // Anything but recovered: true (the first subscribe, recovered: false, no offset yet): load the state.
      if (ack.success && ack.recovered !== true) console.log(`refetch ${kind}:${id}`);
    } catch (err) {
      console.log(`subscribe ${kind}:${id} failed: ${err.message}`); // the next connect tries again
    }
  }
});

// Removed from a campaign: herald took the socket out of its rooms.
socket.on("access_revoked", ({ campaignId }) => {
  console.log(`access_revoked ${campaignId}`);
  rooms = rooms.filter(([kind, id]) => !(kind === "campaign" && id === campaignId));
});

socket.on("disconnect", (reason) => {
  // "transport close" / "transport error": socket.io-client reconnects by itself.
  // "io server disconnect": herald ended the session for good; socket.io-client does not retry.
  console.log(`disconnected: ${reason}${socket.active ? " (reconnecting)" : ""}`);
});

socket.on("connect_error", (err) => {
  if (socket.active) return; // a network error: socket.io-client retries
  console.error(`refused: ${err.message}`); // "Unauthorized": a bad or expired token
  process.exitCode = 1;
});

for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => socket.close());
