// offsets: what one room has been delivered, by offset, and so its next
// `since`. Everything of the room up to `last` was delivered; above it,
// `seen` holds the offsets delivered since, so that an event that comes
// twice (the replays of two rooms of one campaign overlap after a reconnect)
// is dropped. Offsets are fixed-width and compare as plain strings (the
// repository README's "Recovery after a dropped connection").

/** Whether `offset` comes after `than` (anything comes after no offset). */
export function isAfter(offset: string, than: string | undefined): boolean {
  return than === undefined || offset > than;
}

export class RoomOffsets {
  /** Every event of this room up to this offset has been delivered. */
  private lastOffset: string | undefined = undefined;
  /** Offsets above `lastOffset` delivered while the subscribe was not acked yet. */
  private readonly seen = new Set<string>();

  /** The room's next `since`: undefined until an event was delivered and its subscribe acked. */
  get last(): string | undefined {
    return this.lastOffset;
  }

  /**
   * An event of this room arrived with `offset`: false when it was delivered
   * already (drop it), else it counts as delivered from now on. `joined`: the
   * room's subscribe is acked on the current connection (see `advance`).
   */
  accept(offset: string, joined: boolean): boolean {
    if (!isAfter(offset, this.lastOffset)) return false;
    if (this.seen.has(offset)) return false;
    this.seen.add(offset);
    if (joined) this.advance();
    return true;
  }

  /**
   * Once the room's subscribe is acked on this connection, every event of the
   * room up to the highest offset seen has been delivered (herald replays
   * with no gap, then sends live events in order), so that is the next `since`.
   * Before the ack, events that arrive through other rooms' replays may run
   * ahead of this room's own replay, so the watermark waits.
   */
  advance(): void {
    for (const o of this.seen) if (isAfter(o, this.lastOffset)) this.lastOffset = o;
    this.seen.clear();
  }
}
